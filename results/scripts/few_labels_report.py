"""Issue 36: the fork (examples/few_labels.py) against plain LAPO on the same data, budget and seeds.

    python results/scripts/few_labels_report.py RUNS [--labels 64,256,1024] [--data DATA_ROOT/GAME]

RUNS holds <name>-s<seed> run folders: off-s* (plain `lapo.py stage1`, fp32), fork<N>_off-s* (the fork with N
stage-1 labels, fp32: `stage1_share.py run ... --name fork<N>`), sup-s* (tools/diagnose.py supervised-idm, the
ceiling). Prints per seed and as mean ± SE: stage 1's probe, the fork's paired difference from plain stage 1 (same
seed), and, where `lapo.py stage2` and `stage3 --mode offline` ran in a folder, the offline decoder's held-out
accuracy and return at N labels: plain LAPO decoding with N labels against the fork decoding with the same N windows
it saw in stage 1 (equal total labels). With --data, also the majority class of the decoders' held-out windows
(lapo.heldout_centres of the test split): the accuracy of a decoder that always answers that class.
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import lapo  # noqa: E402
from pipeline import fmt_stats  # noqa: E402


def read(runs, name, seed, what):
    path = os.path.join(runs, f"{name}-s{seed}", f"{what}_summary.json")
    return json.load(open(path)) if os.path.exists(path) else None


def offline(runs, name, seed, n):
    """(held-out decoder accuracy, return) of the decoded agent at n labels, or (None, None)."""
    s = read(runs, name, seed, "stage3_offline")
    row = [r for r in (s or {}).get("results", []) if r["method"] == "lapo" and r["labels"] == n]
    return (row[0]["test_acc"], row[0].get("eval_mean_return")) if row else (None, None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs")
    ap.add_argument("--labels", default="64,256,1024")
    ap.add_argument("--data", help="the game folder: also print the decoders' held-out majority class")
    a = ap.parse_args()
    runs = [d.rsplit("-s", 1) for d in os.listdir(a.runs) if "-s" in d]
    names = sorted({n for n, _ in runs})  # every mean over the forks' seeds (plain stage 1 may have more)
    seeds = sorted({int(s) for n, s in runs if n.startswith("fork")} or {int(s) for _, s in runs})
    probe = {n: {s: (read(a.runs, n, s, "stage1") or {}).get("probe_acc") for s in seeds} for n in names}
    print(f"{a.runs}: stage 1's probe per seed (seeds {seeds}), mean ± SE, and the paired difference from plain\n")
    print("| run | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± SE | paired vs plain |")
    print("|---|" + "---|" * (len(seeds) + 2))
    for n in names:
        vals = [probe[n][s] for s in seeds]
        pairs = [probe[n][s] - probe["off"][s] for s in seeds if probe[n][s] is not None
                 and probe.get("off", {}).get(s) is not None]
        cells = " | ".join("-" if v is None else f"{v:.3f}" for v in vals)
        diff = fmt_stats(pairs) + f" (min {min(pairs):+.3f})" if pairs and n.startswith("fork") else ""
        print(f"| {n} | {cells} | {fmt_stats([v for v in vals if v is not None])} | {diff} |")
    majority = ""
    if a.data:
        test = lapo.load_split(a.data, "test")
        y = test.labels(lapo.heldout_centres(test))
        majority = f" (the held-out windows' majority class: {torch.bincount(y).max().item() / len(y):.3f})"
    print("\nOffline decoding at N labels (held-out accuracy; return): plain LAPO's decoder on N labeled windows "
          f"against the fork's on the same N it saw in stage 1{majority}\n")
    print("| N | plain acc | fork acc | paired acc | plain return | fork return | paired return |")
    print("|---|---|---|---|---|---|---|")
    for n in map(int, a.labels.split(",")):
        plain = [offline(a.runs, "off", s, n) for s in seeds]
        fork = [offline(a.runs, f"fork{n}_off", s, n) for s in seeds]
        ok = [i for i in range(len(seeds)) if plain[i][0] is not None and fork[i][0] is not None]
        if not ok:
            continue
        col = lambda rows, k: [rows[i][k] for i in ok]  # noqa: E731
        print(f"| {n} | {fmt_stats(col(plain, 0))} | {fmt_stats(col(fork, 0))} | "
              f"{fmt_stats([fork[i][0] - plain[i][0] for i in ok])} | {fmt_stats(col(plain, 1), 2)} | "
              f"{fmt_stats(col(fork, 1), 2)} | {fmt_stats([fork[i][1] - plain[i][1] for i in ok], 2)} |")


if __name__ == "__main__":
    main()
