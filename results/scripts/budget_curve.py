"""Effect size vs stage-1 budget: the held-out probe accuracy of the latent IDM and of the supervised IDM (same
network, steps and windows, trained on the true actions) at every evaluation of stage 1, mean ± SE over seeds, for
one or more pipeline folders that differ only in --stage1-steps. Also prints each folder's final numbers.

    python results/scripts/budget_curve.py results/budget.png runs/small-starpilot runs/small-starpilot-s1x4
"""
import glob
import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
from pipeline import fmt_stats, read_metrics, seed_numbers, stats  # noqa: E402  (the pipeline's own helpers)


def probe_curve(path):
    """[(step, probe accuracy)] from one stage-1 metrics.jsonl; a resumed run logs a step again: the last one wins."""
    points = {}
    for m in read_metrics(path):  # (skips a torn line, with a note)
        if "stage1/probe_acc" in m:
            points[m["stage1/step"]] = m["stage1/probe_acc"]
    return sorted(points.items())


def band(curves):
    """Curves of several seeds on the same steps -> (steps, mean, SE); SE is 0 with one seed."""
    m = min(map(len, curves))
    steps = [s for s, _ in curves[0][:m]]
    v = np.array([[a for _, a in c[:m]] for c in curves])
    se = v.std(0, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.zeros(m)
    return np.array(steps), v.mean(0), se


def fmt(values):
    s = stats(values)
    return "n/a" if s["mean"] is None else f"{fmt_stats(values)} (n={s['n']})"


def main(png, roots):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, root in enumerate(roots):
        seeds = sorted(d for d in glob.glob(os.path.join(root, "seed*"))
                       if os.path.exists(os.path.join(d, "supervised", "stage1_summary.json")))
        if not seeds:
            print(f"{root}: no seed has finished its supervised IDM; skipped")
            continue
        for kind, style in (("lapo", "-"), ("supervised", "--")):
            steps, mean, se = band([probe_curve(os.path.join(d, kind, "metrics.jsonl")) for d in seeds])
            label = f"{'latent' if kind == 'lapo' else 'supervised'} IDM, {steps[-1]:,} steps ({len(seeds)} seeds)"
            line, = ax.plot(steps, mean, style, color=f"C{i}", label=label)
            ax.fill_between(steps, mean - se, mean + se, color=line.get_color(), alpha=0.2)
        nums = [seed_numbers(d) for d in seeds]
        print(f"{root} ({', '.join(os.path.basename(d) for d in seeds)}): "
              f"probe latent {fmt([x['probe_latent'] for x in nums])}, "
              f"supervised {fmt([x['probe_supervised'] for x in nums])}, "
              f"ratio {fmt([x['probe_ratio'] for x in nums])}, majority {fmt([x['probe_majority'] for x in nums])}")
    ax.set_xlabel("stage-1 step (batch 64)")
    ax.set_ylabel("held-out probe accuracy (true action)")
    ax.set_title("Stage 1 learns the actions slowly: latent vs supervised IDM (mean ± SE)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: budget_curve.py OUT.png PIPELINE_FOLDER [PIPELINE_FOLDER ...]")
    main(sys.argv[1], sys.argv[2:])
