"""A fork of LAPO: a few action labels inside stage 1 (after LAOM: Nikulin et al., "Latent Action Learning Requires
Supervision in the Presence of Distractors", 2025). Stage 1 trains the IDM and the FDM as lapo.py does, plus a linear
action head on the IDM's latent, trained with cross-entropy on a fixed set of N labeled train windows.

    python examples/few_labels.py stage1 --stage1-labels 256 --data data/starpilot --out runs/fl256 [lapo's flags]
    python lapo.py stage2 --data data/starpilot --out runs/fl256     # lapo's later stages take its stage1.pt as it is
    python lapo.py stage3 --mode offline --labels 256 --data data/starpilot --out runs/fl256

The fork copies no code of lapo.py. It registers three flags, replaces one command, and reuses lapo's data, networks,
stage-1 loss (`lapo.stage1_loss`), train loop, checkpoints, resume, probe, errors and run-folder lock.

Choices:
- The head reads the continuous latent z, before the VQ, as LAOM's reads its latent: z is what stage 2 regresses and
  what the probe reads. It reads z through the IDM's encoder alone, so labeled windows never move the codebooks'
  EMA, and through a layer norm, so that the cross-entropy cannot fall by inflating z: on a linear head it did, and
  z left the codebooks (commitment loss 0.0001 -> 1.7, perplexity 3; results/README.md, issue 36).
- Labeled windows enter every step as their own minibatch (--label-batch, drawn with replacement from the N):
  256 labels among 65k windows would put one in a batch of 64 every four steps. They are drawn from torch's global
  stream, which lapo's checkpoint saves (exact resume), so the unlabeled batches are plain LAPO's at the same seed:
  the fork and plain stage 1 differ only by the head's loss.
- The labeled set is `lapo.labeled_centres(train, N, --seed)`: the windows that `lapo.py stage3 --mode offline
  --labels N` at the same seed fits its decoder on, so with equal N the decoder sees no label the fork did not.
- --label-weight 1 adds the two losses as they are. At `tiny` every weight from 0.001 to 1 had the same seeds win
  and lose, none better than 1: the head's gradient dwarfs the FDM's (norm 3-16 against 0.01-0.06 at weight 1),
  and AdamW rescales each parameter's step, so the weight moves the balance little.
- The head is not in the gradient clip: lapo clips the IDM and FDM's norm as it does without the fork.
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: lapo.py
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lapo  # noqa: E402


def add_flags():
    """The fork's flags, in lapo's table (so they are range-checked, saved in the config and checked on --resume)."""
    lapo.flag("--stage1-labels", "stage1", lapo.NONNEG, 256, "labeled train windows for the action head (0: plain "
              "LAPO)")
    lapo.flag("--label-weight", "stage1", lapo.NONNEG_F, 1.0, "weight of the action head's cross-entropy")
    lapo.flag("--label-batch", "stage1", lapo.POS, lapo.P(64, 64, 16), "labeled windows per step, drawn from the N")


def build_few_labels(args, train_data, test_data, device):
    """lapo.build_stage1 plus the action head and a train step that adds its loss. -> what build_stage1 returns."""
    modules, opt, lr_fn, train_step, evaluate = lapo.build_stage1(args, train_data, test_data, device)
    if args.stage1_labels == 0:
        return modules, opt, lr_fn, train_step, evaluate
    if train_data.ta is None:
        raise lapo.LapoError(f"--stage1-labels needs the true actions 'ta' in {train_data.name}")
    if args.stage1_labels > len(train_data.centres):
        raise lapo.LapoError(f"--stage1-labels {args.stage1_labels} asks for more than the {len(train_data.centres)} "
                             f"windows in {train_data.name}")
    centres = lapo.labeled_centres(train_data, args.stage1_labels, args.seed)
    labels = train_data.labels(centres).to(device)
    idm, fdm, amp = modules["idm"], modules["fdm"], lapo.use_amp(args, device)
    params = [p for m in modules.values() for p in m.parameters()]  # lapo's, clipped as lapo clips them
    modules["head"] = head = nn.Linear(args.latent_dim, lapo.NUM_ACTIONS).to(device)  # saved, resumed with the rest
    opt.add_param_group({"params": list(head.parameters())})  # train_loop sets every group's learning rate

    def train_step(gen):
        w = train_data.windows(train_data.sample(args.batch_size, gen), device)
        loss, metrics = lapo.stage1_loss(idm, fdm, w, args, amp)  # plain LAPO's loss on plain LAPO's batch
        pick = torch.randint(len(centres), (args.label_batch,))  # torch's global stream: in lapo's checkpoint
        with lapo.autocast(device, amp):
            z = idm.encoder(lapo.preprocess(train_data.windows(centres[pick.to(centres.device)], device))).float()
        action_loss = F.cross_entropy(head(F.layer_norm(z, z.shape[-1:])), labels[pick.to(device)])
        gn = lapo.optimize(opt, loss + args.label_weight * action_loss, params, args.max_grad_norm or math.inf)
        return {**metrics, "action_loss": action_loss.detach(), "grad_norm": gn}

    return modules, opt, lr_fn, train_step, evaluate


def stage1(args, train=None, test=None):
    """lapo.stage1 with the fork's build. -> (idm, fdm, summary)"""
    if lapo.ddp_world()[1] > 1:  # (its step runs the unwrapped modules: under DDP no gradient would be averaged)
        raise lapo.LapoError("examples/few_labels.py trains in one process; run it with python, not torchrun")
    modules, summary = lapo.run_stage("stage1", build_few_labels, args, train, test)
    return modules[0], modules[1], summary


if __name__ == "__main__":
    add_flags()
    lapo.COMMANDS = {"stage1": ("stage 1 with a few action labels (a fork of lapo.py)", stage1)}
    lapo.main()
