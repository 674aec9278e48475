"""Two checks on stage 1's held-out probe, on the finished runs of a pipeline folder (measurement record).

1. Is the probe itself the limit? Refit it with all test windows instead of 2,048, and with 2,000 steps instead of
   300.
2. Which part of the action does each IDM's latent carry? Probe the horizontal (left/none/right) and vertical
   (down/none/up) parts of the 9 movement actions (the 6 keys D, A, W, S, Q, E count as no movement) and "D".

    python results/scripts/probe_analysis.py runs/small-starpilot starpilot 0 1 2
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import lapo  # noqa: E402

H = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1])
V = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 1, 1, 1, 1, 1, 1])
KEY_D = (torch.arange(15) == 9).long()


def main(root, game, seeds):
    test, cpu = lapo.load_split(os.path.join(root, "data", game), "test"), torch.device("cpu")
    freq = torch.bincount(test.ta, minlength=15).float() / len(test.ta)
    print("test-split action frequencies:", ", ".join(f"{a} {f:.3f}" for a, f in zip(lapo.ACTION_NAMES, freq)))
    order = test.centres[torch.randperm(len(test.centres), generator=torch.Generator().manual_seed(0))]
    for seed in seeds:
        for kind in ("lapo", "supervised"):
            _, ck = lapo.load_stage(os.path.join(root, f"seed{seed}", kind), "stage1")
            idm = lapo.build_idm(ck["config"])
            idm.load_state_dict(ck["idm"])
            z, y = lapo.idm_latents(idm, test, order, cpu, False), test.labels(order)
            sizes = [f"{n} windows, {s} steps {lapo.probe_accuracy(z[:n], y[:n], 0, s)[0]:.3f}"
                     for n in (2048, len(z)) for s in (300, 2000)]
            parts = [(name, *lapo.probe_accuracy(z, m[y], 0, 300)) for name, m in
                     (("horizontal", H), ("vertical", V), ("D", KEY_D))]
            parts = [f"{name} {acc:.3f} (majority {maj:.3f})" for name, acc, maj in parts]
            print(f"seed {seed} {kind}: probe " + "; ".join(sizes) + " | parts: " + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
