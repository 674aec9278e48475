"""How much of the offline comparison is evaluation noise? Re-evaluate every offline policy of finished pipeline
seeds (LAPO's decoded_<n>.pt and BC's bc_<n>.pt) with many more episodes than the pipeline's 64, and print the
paired LAPO - BC difference per label count, mean ± SE over seeds, beside the pipeline's own 64-episode numbers.

    python results/scripts/reeval.py runs/small-starpilot 512 0 1 2 > results/reeval-small-starpilot.md
"""
import contextlib
import json
import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import lapo  # noqa: E402
from pipeline import fmt_stats, read_json  # noqa: E402  (mean ± SE over seeds, as results.md writes it)


def main(root, episodes, seeds):
    rows = {}  # labels -> list over seeds of (lapo64, bc64, lapoN, bcN)
    for seed in seeds:
        run = os.path.join(root, f"seed{seed}", "lapo")
        old = {(r["method"], r["labels"]): r["eval_mean_return"]
               for r in read_json(os.path.join(run, "stage3_offline_summary.json"))["results"]}
        for n in sorted({n for _, n in old}):
            new = {}
            for method, name in (("lapo", "decoded"), ("bc", "bc")):
                args = lapo.parse_args(["eval", "--checkpoint", os.path.join(run, f"{name}_{n}.pt"), "--preset",
                                        "small", "--episodes", str(episodes), "--seed", str(seed)])
                with contextlib.redirect_stdout(sys.stderr):  # progress to stderr, the table alone to stdout
                    new[method] = lapo.eval_cmd(args)["eval_mean_return"]
            rows.setdefault(n, []).append((old["lapo", n], old["bc", n], new["lapo"], new["bc"]))
    print(f"{root}, seeds {', '.join(map(str, seeds))}: mean return, mean ± SE over seeds\n")
    e = f"{episodes} eps"
    print("| labels | LAPO (64 eps) | BC (64 eps) | LAPO − BC (64 eps) | "
          f"LAPO ({e}) | BC ({e}) | LAPO − BC ({e}) |")
    print("|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        r = np.asarray(r)
        cells = [r[:, 0], r[:, 1], r[:, 0] - r[:, 1], r[:, 2], r[:, 3], r[:, 2] - r[:, 3]]
        print(f"| {n} | " + " | ".join(fmt_stats(c, 2) for c in cells) + " |")
    print("\nper seed, LAPO − BC at", episodes, "episodes:",
          json.dumps({n: [round(a - b, 3) for _, _, a, b in r] for n, r in rows.items()}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3:]])
