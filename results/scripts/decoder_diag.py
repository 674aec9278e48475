"""Where does offline decoding lose the action? For finished pipeline seeds, fit the offline decoder exactly as
`stage3 --mode offline` does (lapo.fit_decoder, same labeled frames, initial weights and seeds; fp32 latents, where
`small` uses bf16) on three inputs, and print its accuracy on 2,048 held-out test frames, next to the majority class:

- pi -> pi: fit on the latent policy's pi(o_t), tested on pi(o_t) (what the decoded agent does);
- IDM -> IDM: fit and tested on the IDM's latents of (o_{t-1}, o_t, o_{t+1}) (what stage 1 knows of the action);
- IDM -> pi: fit on IDM latents, tested on pi(o_t) (the paper's other offline option).

If IDM -> IDM is well above pi -> pi, stage 2 (latent behaviour cloning) is where the action is lost. A second
table says why, on the same held-out frames: the action's share of each latent's variance (eta^2: the variance
of the per-action means over the total variance, i.e. the R^2 of a linear fit on the one-hot action) for the IDM
latents z, for pi(o_t), and for what pi leaves unexplained (z - pi(o_t)), next to the share of z's variance pi
explains; a third the same for z's first principal component alone. No env steps, so it takes about a minute
per seed on 2 CPU cores (more at large label counts). Ran at commit 10d5c45, when the decoder standardized its
input (`fit_decoder(..., True)`); that option left in 51fe7f3, so check 10d5c45 out to rerun it.

    python results/scripts/decoder_diag.py runs/small-starpilot-t05 starpilot 0 1 2
    LABELS=64301 python results/scripts/decoder_diag.py ...   # other label counts (64301: every train frame)
"""
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import lapo  # noqa: E402
from pipeline import fmt_stats  # noqa: E402


def action_share(z, y):
    """eta^2: the share of the latents' total variance (summed over dimensions) between the per-action means."""
    mu = z.mean(0)
    onehot = torch.nn.functional.one_hot(y, lapo.NUM_ACTIONS).float()
    count = onehot.sum(0)
    means = (onehot.T @ z)[count > 0] / count[count > 0, None]
    return ((means - mu).pow(2).sum(1) * count[count > 0]).sum().item() / (z - mu).pow(2).sum().item()


def explained(target, pred):
    """R^2: the share of the target's variance (summed over dimensions) that the prediction explains."""
    return 1 - (target - pred).pow(2).sum().item() / (target - target.mean(0)).pow(2).sum().item()


def diagnose(run, data, labels, steps, seed):
    """-> {(input, n): held-out accuracy} plus the majority rate, for one seed's stage-1/stage-2 checkpoints."""
    train, test = lapo.load_split(data, "train"), lapo.load_split(data, "test")
    idm, _ = lapo.load_stage1(run, "cpu")
    policy, ck2 = lapo.load_stage2(run, "cpu")
    tc = lapo.heldout_centres(test)
    ty = test.labels(tc)
    test_z = {"pi": lapo.policy_latents(policy, test.obs[tc.cpu()], "cpu", False),
              "idm": lapo.idm_latents(idm, test, tc, "cpu", False)}
    z, pi = test_z["idm"], test_z["pi"]
    _, sv, v = torch.linalg.svd(z - z.mean(0), full_matrices=False)
    pc, pc_pi = (z - z.mean(0)) @ v[0], (pi - z.mean(0)) @ v[0]  # z's first principal component, and pi's along it
    shares = {"eta2 z": action_share(z, ty), "eta2 pi": action_share(pi, ty), "eta2 z - pi": action_share(z - pi, ty),
              "pi explains": explained(z, pi), "pc1 share": (sv[0] ** 2 / sv.pow(2).sum()).item(),
              "eta2 pc1": action_share(pc[:, None], ty), "pi R2 pc1": explained(pc, pc_pi)}
    perm = torch.randperm(len(train.centres), generator=torch.Generator().manual_seed(seed))
    out = {"majority": (ty == torch.bincount(train.labels(train.centres), minlength=lapo.NUM_ACTIONS).argmax())
           .float().mean().item()}
    for n in labels:
        c = train.centres[perm[:n]]
        y = train.labels(c)
        fit = {"pi": lapo.policy_latents(policy, train.obs[c.cpu()], "cpu", False),
               "idm": lapo.idm_latents(idm, train, c, "cpu", False)}
        for src, dst in (("pi", "pi"), ("idm", "idm"), ("idm", "pi")):
            torch.manual_seed(seed + n)  # the decoder's initial weights, drawn as stage 3 draws them
            dec = lapo.DecodedAgent(ck2["config"]["impala_scale"], fit[src].shape[1]).decoder
            lapo.fit_decoder(dec, fit[src], y, steps, seed + n, True)
            out[f"{src} -> {dst}", n] = lapo.accuracy(dec, test_z[dst], ty, "cpu")
    return out, shares


def main(root, game, seeds, labels=(64, 256, 1024), steps=1000):
    both = [diagnose(os.path.join(root, f"seed{s}", "lapo"), os.path.join(root, "data", game), labels, steps, s)
            for s in seeds]
    per_seed = [d for d, _ in both]
    print(f"{root}, seeds {', '.join(map(str, seeds))}: decoder accuracy on held-out test frames, mean ± SE\n")
    print("| decoder fit -> tested on | " + " | ".join(f"{n} labels" for n in labels) + " |")
    print("|---|" + "---|" * len(labels))
    for key in ("pi -> pi", "idm -> idm", "idm -> pi"):
        print(f"| {key} | " + " | ".join(fmt_stats([d[key, n] for d in per_seed]) for n in labels) + " |")
    print(f"\nmajority class: {fmt_stats([d['majority'] for d in per_seed])}")
    print("\n| on the held-out frames | action's share of the variance of z | of pi(o_t) | of z - pi(o_t) "
          "| share of z's variance pi explains |\n|---|---|---|---|---|")
    print("| mean ± SE | " + " | ".join(fmt_stats([sh[k] for _, sh in both])
                                     for k in ("eta2 z", "eta2 pi", "eta2 z - pi", "pi explains")) + " |")
    print("\n| z's first principal component | share of z's variance | action's share of its variance | "
          "share of it pi explains (R^2) |\n|---|---|---|---|")
    print("| mean ± SE | " + " | ".join(fmt_stats([sh[k] for _, sh in both])
                                     for k in ("pc1 share", "eta2 pc1", "pi R2 pc1")) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    labels = tuple(int(n) for n in os.environ.get("LABELS", "64,256,1024").split(","))
    main(sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]], labels)
