"""Diagnostics of LAPO built from lapo.py's own pieces; not part of the method.

    python tools/diagnose.py supervised-idm --data data/starpilot --out runs/sup [--preset small] [stage1 flags]

supervised-idm: the ceiling of stage 1's probe. Stage 1's IDM (without its VQ) trained on the true actions through
a linear action head instead of the FDM, with stage 1's data, train loop, LR schedule and held-out probe windows.
Its probe accuracy is what the latent IDM's is measured against (tools/pipeline.py reports both). It takes every
`python lapo.py stage1` flag (--help lists them) and writes <out>/stage1.pt and stage1_summary.json, which `stage2`
refuses: they are not a latent IDM.
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: lapo.py
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lapo  # noqa: E402

USAGE = ("usage: python tools/diagnose.py supervised-idm --data DIR/GAME --out DIR [any `python lapo.py stage1` "
         "flag]")


def build_supervised(args, train_data, test_data, device):
    """build_stage1's counterpart: the IDM and a linear action head on its latent, cross-entropy on the true actions.
    -> (modules, opt, lr_fn, train_step, evaluate) for lapo.train_loop"""
    for d in (train_data, test_data):
        if d.ta is None:
            raise lapo.LapoError(f"the supervised IDM trains and is probed on the true actions, but {d.name} has no "
                                 "'ta'")
    args.game = train_data.game
    lapo.seed_everything(args.seed)
    modules, params, opt, amp = lapo.stage_setup(args, train_data, device, idm=lapo.build_idm(vars(args)),
                                                 head=nn.Linear(args.latent_dim, lapo.NUM_ACTIONS))
    idm, head = modules["idm"], modules["head"]
    ddp_idm, ddp_head, batch = lapo.ddp_train(args, idm, head)  # the train step's (DDP under torchrun), its batch
    _, probe_c = lapo.stage1_test_windows(args, test_data)  # the latent IDM's probe windows
    print(f"supervised IDM: {len(train_data)} train frames, {len(test_data)} test frames | device {device} amp {amp}",
          flush=True)

    def train_step(gen):
        c = train_data.sample(batch, gen)
        with lapo.autocast(device, amp):
            logits = ddp_head(ddp_idm(train_data.windows(c, device))["z"])
        loss = F.cross_entropy(logits.float(), train_data.labels(c).to(device))
        return {"action_loss": loss.detach(), "grad_norm": lapo.optimize(opt, loss, params,
                                                                         args.max_grad_norm or math.inf)}

    @torch.no_grad()
    def evaluate():
        z, y = lapo.idm_latents(idm, test_data, probe_c, device, amp), test_data.labels(probe_c)
        acc, majority = lapo.probe_accuracy(z, y, args.seed)
        test_acc = (head(z.to(device)).argmax(-1).cpu() == y).float().mean().item()  # the action head itself
        return {"probe_acc": acc, "probe_majority": majority, "test_acc": test_acc}

    return modules, opt, lapo.stage1_lr_fn(args.stage1_steps), train_step, evaluate


def supervised_idm(args, train=None, test=None):
    """Train the supervised IDM into args.out. -> (idm, action head, summary)"""
    args.supervised, args.vq = 1, False  # in the checkpoint's config: stage 2 refuses it as a latent IDM
    (idm, head), summary = lapo.run_stage("stage1", build_supervised, args, train, test)
    return idm, head, summary


def parse(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if not argv or argv[0] != "supervised-idm":
        raise lapo.LapoError(USAGE)
    args = lapo.parse_args(["stage1", *argv[1:]])
    args.func = supervised_idm
    return args


def main(argv=None):
    lapo.main(argv, parse)


if __name__ == "__main__":
    main()
