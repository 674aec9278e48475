"""Issue 22: what in the old FDM (commit f5b619b, before the fidelity change) made the latent matter? Stage 1 at
`small`, 3 seeds, with the FDM swapped; everything else is lapo.py as it is (run at 6fcc819; results/README.md).
A queue of resumable pieces: run it again and it continues (finished runs are skipped, a killed one resumes).

    python results/scripts/fdm_ablation.py DATA/bigfish runs/fdm_ablation            # all variants, 3 seeds
    python results/scripts/fdm_ablation.py DATA/bigfish runs/fdm_ablation --report   # the table so far

Variants (all with `--fdm-residual 1`, as `small`, except old_direct):
- new:   lapo's FDM, the authors' U-Net (what `small` runs).
- old:   the FDM of f5b619b (skips taken before pooling, at 64..4 px; down block conv -> BN -> ReLU -> ResBlock with
         BN; up path transposed conv -> concat skip -> conv -> BN -> ReLU; head conv -> ReLU -> conv).
- light: the authors' U-Net without the ResBlocks of its up path and head (the old FDM's lighter output path).
- old_direct: the old FDM with `--fdm-residual 0` (it predicts o_{t+1}, not o_t + change).
"""
import os
import subprocess
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
from pipeline import fmt_stats, read_json, read_metrics, stats  # noqa: E402

import lapo  # noqa: E402

SEEDS, VARIANTS = (0, 1, 2), ("new", "old", "light", "old_direct")  # queue order: the main comparison first


class OldResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv0, self.norm, self.conv1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 3,
                                                                                                         padding=1)

    def forward(self, x):
        return x + self.conv1(F.relu(self.norm(self.conv0(F.relu(x)))))


class OldConvBlock(nn.Module):
    def __init__(self, cin, cout, res=True):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)
        self.res = OldResBlock(cout) if res else nn.Identity()

    def forward(self, x, bias=None):
        x = self.conv(x)
        return self.res(F.relu(self.norm(x if bias is None else x + bias)))


class OldFDM(nn.Module):
    """f5b619b's forward model, rebuilt from that commit's lapo.py (same modules, same order of creation)."""

    def __init__(self, latent_dim=128, width=24, depth=5, residual=True):
        super().__init__()
        widths = [width * 2 ** i for i in range(depth)]
        self.residual = residual
        self.z_in = lapo.TiledLatentConv(torch.randn(width, latent_dim, 3, 3) / (9 * (latent_dim + 6)) ** 0.5)
        self.down, c = nn.ModuleList(), 6
        for w in widths:
            self.down.append(OldConvBlock(c, w))
            c = w
        self.mid = nn.Conv2d(c, 2 * c, 2)
        c = 2 * c + latent_dim
        self.ups, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for skip, out in zip([widths[-1]] + widths[::-1], widths[::-1] + [width]):
            self.ups.append(nn.ConvTranspose2d(c, skip, 2, stride=2))
            self.up_blocks.append(OldConvBlock(2 * skip, out, res=False))
            c = out
        self.head = nn.Sequential(nn.Conv2d(c + 6, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 3, 1))
        if residual:
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    def forward(self, frames, zq):
        x = x_in = lapo.preprocess(frames)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x, self.z_in(zq.to(x.dtype)) if i == 0 else None)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        skips.append(x)
        x = torch.cat([F.relu(self.mid(x)), zq.to(x.dtype)[:, :, None, None]], 1)
        for up, block in zip(self.ups, self.up_blocks):
            x = block(torch.cat([up(x), skips.pop()], 1))
        out = self.head(torch.cat([x, x_in.to(x.dtype)], 1))
        if self.residual:
            return x_in[:, 3:].to(out.dtype) + torch.tanh(out)
        return torch.tanh(out) / 2


def light_fdm(cfg):
    fdm = lapo.FDM(cfg["latent_dim"], cfg["fdm_width"], residual=bool(cfg["fdm_residual"]))
    for block in fdm.up:
        block.res = nn.Identity()
    fdm.head[1] = nn.Identity()
    return fdm


BUILD = {"new": lapo.build_fdm,
         "old": lambda cfg: OldFDM(cfg["latent_dim"], cfg["fdm_width"], residual=bool(cfg["fdm_residual"])),
         "light": light_fdm}
BUILD["old_direct"] = BUILD["old"]
FLAGS = {"old_direct": ["--fdm-residual", "0"]}  # the old FDM predicting o_{t+1} itself, as the paper's


def one(data, out, variant, seed):
    lapo.build_fdm = BUILD[variant]
    resume = ["--resume"] if os.path.exists(os.path.join(out, "stage1.pt")) else []
    lapo.main(["stage1", "--preset", "small", "--data", data, "--out", out, "--seed", str(seed)] + resume
              + FLAGS.get(variant, []))


@torch.no_grad()
def z_reliance(run, build, test):
    """How much the trained FDM relies on the latent: its test loss with each window's own z_q, and with the z_q of
    another window of the batch (rolled by one). -> loss with foreign z / loss with own z (1.0: z is ignored)"""
    ck = lapo.load_checkpoint(os.path.join(run, "stage1.pt"), ("stage1",))
    idm, fdm = lapo.build_idm(ck["config"]), build(ck["config"])
    idm.load_state_dict(ck["idm"])
    fdm.load_state_dict(ck["fdm"])
    idm.eval(), fdm.eval()
    centres, own, other = test.sample(1024, torch.Generator().manual_seed(12345)), 0.0, 0.0
    for i in range(0, len(centres), 256):
        w = test.windows(centres[i:i + 256], "cpu")
        zq, target = idm(w)["zq"], lapo.preprocess(w[:, 2])
        own += F.mse_loss(fdm(w[:, :2], zq), target, reduction="sum").item()
        other += F.mse_loss(fdm(w[:, :2], zq.roll(1, 0)), target, reduction="sum").item()
    return other / own


def final_perplexity(run):
    return [r["stage1/perplexity"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))
            if "stage1/perplexity" in r][-1]


def report(data, root):
    """Per variant: probe per seed, mean ± SE, the paired difference from `new` (same seed, same data), test FDM
    loss, the FDM's reliance on z, and the code perplexity at the last step."""
    test = lapo.load_split(data, "test")
    runs = {v: [os.path.join(root, f"{v}-s{s}") for s in SEEDS] for v in VARIANTS}
    summary = {v: [read_json(os.path.join(f, "stage1_summary.json")) for f in fs] for v, fs in runs.items()}
    probe = {v: [x and x["probe_acc"] for x in xs] for v, xs in summary.items()}
    print("| FDM | probe per seed | probe mean ± SE | paired vs new | test FDM loss | loss with another window's z / "
          "own z | code perplexity at the end |")
    print("|---|---|---|---|---|---|---|")
    for v, folders in runs.items():
        done = [f for f, p in zip(folders, probe[v]) if p is not None]
        if not done:
            continue
        loss = [x["test_fdm_loss"] for x in summary[v] if x is not None]
        ratio = [z_reliance(f, BUILD[v], test) for f in done]
        paired = [p - q for p, q in zip(probe[v], probe["new"]) if p is not None and q is not None]
        row = [v, " / ".join(f"{p:.3f}" for p in probe[v] if p is not None), fmt_stats(probe[v]),
               fmt_stats(paired) if v != "new" else "", f"{stats(loss)['mean']:.6f}",
               " / ".join(f"{r:.3f}" for r in ratio), " / ".join(f"{final_perplexity(f):.1f}" for f in done)]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    data, root = sys.argv[1], sys.argv[2]
    if sys.argv[3:4] == ["--one"]:
        one(data, os.path.join(root, f"{sys.argv[4]}-s{sys.argv[5]}"), sys.argv[4], int(sys.argv[5]))
    elif sys.argv[3:4] == ["--report"]:
        report(data, root)
    else:
        queue = [(v, s) for s in SEEDS for v in VARIANTS[:2]] + [(v, s) for v in VARIANTS[2:] for s in SEEDS]
        for v, s in queue:
            if not os.path.exists(os.path.join(root, f"{v}-s{s}", "stage1_summary.json")):
                subprocess.run([sys.executable, __file__, data, root, "--one", v, str(s)], check=True)
