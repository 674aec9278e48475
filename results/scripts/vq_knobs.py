"""Issue 34: candidate fixes for stage 1's half-found runs, as a research script that imports lapo (nothing in lapo.py
changes until a knob passes the issue's rule: more runs find the action on both videos over 8 seeds, neither mean
lower).

    python results/scripts/vq_knobs.py stage1 --vq-restart 0.1 [lapo's stage-1 flags]
    python results/scripts/vq_knobs.py stage1 --vq-count-init 1 [...]
    python results/scripts/vq_knobs.py stage1 --vq-data-init 1 [...]
    python results/scripts/vq_knobs.py stage1 --log-spread 1 [...]      # plain stage 1, the latents' spread logged

What a half-found run looks like (sprite video, `small`, seed 0, fp32: probe 0.65 against the supervised 0.91): its
probe confuses actions in pairs that are not neighbours in the plane, and 6 of its 8 code slots use 1-3 of their 64
codes. Most codes died in the EMA's first steps (REFERENCE: counts start at 0, so every code unused in step 1 is
divided by a tiny count and leaves), and a code that serves two actions has no way to split.

- --vq-restart X: after each EMA update, every code whose EMA count is below X moves to a randomly drawn latent vector
  of this batch (its count set to 1, its EMA sum to that vector): dead codes come back where the data is (the usual
  dead-code restart of VQ audio and image models). X = 0: the authors' VQ.
- --vq-count-init C: the EMA counts start at C instead of 0 (and the EMA sums at C times the initial codebook, so the
  codebook starts where it did): REFERENCE's note that starting the counts at 1 removes the early collapse.

- --vq-data-init 1: the codes start at 64 latent vectors of the first training batch (drawn without replacement
  from the batch's vectors of that codebook), with EMA counts of 1 (or --vq-count-init, if larger) and sums to match.
  Why (measured at initialization, `small`, seeds 0-2, sprite and starpilot): a slot's latent vectors spread 0.02-0.03
  around their mean, while the nearest codes of the uniform +-5/64 codebook lie 0.17 apart, so every vector of a slot
  takes the same code from step 1 and z carries nothing until the encoder spreads its latents that far; started among
  the latents, the codes split each slot's vectors from the first step.

The knobs draw from torch's global stream (in lapo's checkpoint: exact resume holds). One process only (no torchrun).
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch  # noqa: E402

import lapo  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trunk_life import live_share, trunk  # noqa: E402

KNOBS = {"vq_restart": 0.0, "vq_count_init": 0.0, "vq_data_init": 0, "spread_log": None}


def log_spread(z, per, dim):
    """Append this training batch's latent spread (RMS distance of a slot's vectors from their batch mean, averaged
    over the 8 slots) and the IDM trunk's life (the share of its last ReLU's units positive for some window of the
    batch; 0: z is one constant vector) to spread.jsonl: what separates runs that find the action from collapsed ones."""
    v = z.detach().float().view(z.shape[0], -1, dim)
    spread = (v - v.mean(0)).pow(2).sum(-1).mean(0).sqrt().mean().item()
    KNOBS["calls"] = KNOBS.get("calls", 0) + 1  # a training step's call (evaluations run in eval mode)
    with open(KNOBS["spread_log"], "a") as f:
        f.write(json.dumps({"call": KNOBS["calls"], "pid": os.getpid(), "spread": spread,
                            "alive": KNOBS.get("alive")}) + "\n")


def trunk_hook(module, inputs, out):
    if module.training:
        KNOBS["alive"] = live_share(out)


def build_idm(cfg):
    idm = BUILD_IDM(cfg)
    if KNOBS["spread_log"]:
        trunk(idm).register_forward_hook(trunk_hook)
    return idm


class KnobVQ(lapo.VectorQuantizer):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        count = max(KNOBS["vq_count_init"], 1.0 if KNOBS["vq_data_init"] else 0.0)
        if count:
            self.cluster_size.fill_(count)
            self.embed_sum.mul_(count)

    def forward(self, z):
        if KNOBS["spread_log"] and self.training:
            log_spread(z, self.per, self.D)
        # untouched counts (no EMA update yet: neither a resumed run nor an evaluation) -> codes from this batch
        if KNOBS["vq_data_init"] and self.training and bool((self.cluster_size == self.cluster_size[0, 0]).all()):
            with torch.no_grad():
                zg = z.detach().float().view(z.shape[0], self.G, self.per, self.D).transpose(0, 1).reshape(
                    self.G, -1, self.D)
                pick = torch.stack([torch.randperm(zg.shape[1])[:self.K] for _ in range(self.G)]).to(z.device)
                self.codebook.copy_(torch.gather(zg, 1, pick.unsqueeze(-1).expand(-1, -1, self.D)))
                self.embed_sum.copy_(self.codebook * self.cluster_size.unsqueeze(-1))
        return super().forward(z)

    @torch.no_grad()
    def _ema_update(self, zg, onehot):
        super()._ema_update(zg, onehot)
        if KNOBS["vq_restart"]:
            dead = self.cluster_size < KNOBS["vq_restart"]  # (G, K)
            pick = torch.randint(zg.shape[1], dead.shape).to(zg.device)  # a batch vector per code, per codebook
            new = torch.gather(zg, 1, pick.unsqueeze(-1).expand(-1, -1, self.D))
            self.codebook.copy_(torch.where(dead.unsqueeze(-1), new, self.codebook))
            self.embed_sum.copy_(torch.where(dead.unsqueeze(-1), new, self.embed_sum))
            self.cluster_size.copy_(torch.where(dead, torch.ones_like(self.cluster_size), self.cluster_size))


def add_flags():
    lapo.flag("--vq-restart", "stage1", lapo.num(float, 0, 1000), 0.0, "restart codes whose EMA count is below this "
              "at a batch latent (0: off, the authors')")
    lapo.flag("--vq-count-init", "stage1", lapo.num(float, 0, 1000), 0.0, "initial EMA code counts (0: the authors')")
    lapo.flag("--vq-data-init", "stage1", lapo.num(int, 0, 1), 0, "1: codes start at latents of the first batch "
              "(counts 1); 0: uniform +-5/64, the authors'")
    lapo.flag("--log-spread", "stage1", lapo.num(int, 0, 1), 0, "1: write each training step's within-slot latent "
              "spread to OUT/spread.jsonl (changes no computation)")


def stage1(args, train=None, test=None):
    if lapo.ddp_world()[1] > 1:
        raise lapo.LapoError("vq_knobs.py trains in one process; run it with python, not torchrun")
    per = args.latent_dim // args.code_dim // args.num_codebooks  # a sample's vectors per codebook
    if args.vq_data_init and args.batch_size * per < args.codebook_size:
        raise lapo.LapoError(f"--vq-data-init needs --batch-size x {per} >= --codebook-size {args.codebook_size}")
    KNOBS.update(vq_restart=args.vq_restart, vq_count_init=args.vq_count_init, vq_data_init=args.vq_data_init,
                 spread_log=os.path.join(args.out, "spread.jsonl") if args.log_spread else None)
    return lapo.stage1(args, train, test)


lapo.VectorQuantizer = KnobVQ  # IDM builds its VQ from lapo's namespace
BUILD_IDM, lapo.build_idm = lapo.build_idm, build_idm

if __name__ == "__main__":
    add_flags()
    lapo.COMMANDS = {"stage1": ("stage 1 with the VQ knobs of issue 34", stage1)}
    lapo.main()
