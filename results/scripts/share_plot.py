"""Issue 34: every stage-1 run's probe on each video, as the share of the supervised ceiling above the majority class
(top: at the end of each run, one dot per seed; bottom: at each evaluation), from the rows that
`stage1_share.py archive` keeps in results/s34/<video>/<name>_<amp>-s<seed>/report_row.json (gpu-starpilot/s3000:
starpilot's runs on an H200, on data collected there).

    python results/scripts/share_plot.py OUT.png [--ceiling sprite=0.908]   # other videos: their sup-s* runs
"""
import argparse
import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

S34 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "s34")


def label(name):
    """off / on: plain stage 1 in fp32 / bf16; fork<N>_off: the fork at N labels; <knob>_off: a knob's screen."""
    name, amp = name.rsplit("_", 1) if "_" in name else ("plain", name)
    return f"{name.replace('fork', 'fork ')} {dict(off='fp32', on='bf16').get(amp, amp)}"


def rows(video):
    out = {}
    for f in sorted(glob.glob(os.path.join(S34, video, "*-s*", "report_row.json"))):
        name, seed = os.path.basename(os.path.dirname(f)).rsplit("-s", 1)
        out.setdefault(name, {})[int(seed)] = json.load(open(f))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--ceiling", action="append", default=["sprite=0.908"], help="VIDEO=PROBE, where no sup-s* run")
    a = ap.parse_args()
    given = {k: float(v) for k, v in (c.split("=") for c in a.ceiling)}
    every = {v: rows(v) for v in ("sprite", "starpilot", "gpu-starpilot/s3000", "bossfight")}  # (chaser: a ceiling)
    videos = [v for v, runs in every.items() if set(runs) - {"sup"}]
    fig, axes = plt.subplots(2, len(videos), figsize=(5 * len(videos), 7), squeeze=False)
    for col, video in enumerate(videos):
        runs = every[video]
        sup = runs.pop("sup", {})
        ceiling = given.get(video) or sum(r["probe_acc"] for r in sup.values()) / max(1, len(sup))
        share = lambda r, p: (p - r["probe_majority"]) / (ceiling - r["probe_majority"])  # noqa: E731
        top, bottom = axes[0][col], axes[1][col]
        for i, (name, seeds) in enumerate(sorted(runs.items())):
            vals = [share(r, r["probe_acc"]) for r in seeds.values()]
            found = sum(v >= 0.8 for v in vals)
            top.scatter([i] * len(vals), vals, s=18, alpha=0.7, color=f"C{i}")
            top.annotate(f"{found}/{len(vals)}", (i, 1.05), ha="center", fontsize=8)
            for j, r in enumerate(seeds.values()):
                steps, probes = zip(*r["curve"])
                bottom.plot(steps, [share(r, p) for p in probes], color=f"C{i}", alpha=0.6, lw=1,
                            label=None if j else label(name))
        top.set_xticks(range(len(runs)), [label(n) for n in sorted(runs)], rotation=20, fontsize=8)
        low = min([-0.2] + [share(r, p) - 0.05 for seeds in runs.values() for r in seeds.values()
                            for _, p in r["curve"]])  # bossfight's runs read below its majority class
        for ax in (top, bottom):
            ax.axhline(0.8, color="k", ls="--", lw=0.8)
            ax.set_ylim(low, 1.15)
        title = "starpilot on an H200" if video.startswith("gpu") else video  # (not `name`: the runs' loop above)
        top.set_title(f"{title}: ceiling {ceiling:.3f} (runs found / all)")
        top.set_ylabel("share of ceiling above majority")
        bottom.set_xlabel("stage-1 step")
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
