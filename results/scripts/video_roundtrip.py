"""Issue 24's round trip: what lossy video costs stage 1. A `small` pipeline's starpilot data (its expert's, the data
the README's results come from) is exported to H.264 mp4 at the codec's default quality with its action sidecars,
imported again (the same train/test split, kept with --test-src), and stage 1 and the supervised IDM (the probe's
ceiling: how much of the action the frames still show) train on it exactly as the pipeline's own did on the raw
frames, 3 seeds. A queue of resumable pieces: run it again and it continues.

    python tools/pipeline.py --env starpilot --preset small --seeds 0,1,2 --only stage1,supervised --out runs/sp
    python results/scripts/video_roundtrip.py runs/sp [--supervised-only]   # then: --report
"""
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
from pipeline import read_json, stats  # noqa: E402

SEEDS = (0, 1, 2)


def run(script, *argv):
    print(f"+ {script}", " ".join(argv), flush=True)
    subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], check=True)


def probe(path):
    return (read_json(os.path.join(path, "stage1_summary.json")) or {}).get("probe_acc")


def report(root):
    for kind in ("lapo", "supervised"):
        raw = {s: probe(os.path.join(root, f"seed{s}", kind)) for s in SEEDS}
        rt = {s: probe(os.path.join(root, "video", f"seed{s}", kind)) for s in SEEDS}
        diff = [rt[s] - raw[s] for s in SEEDS if rt[s] is not None and raw[s] is not None]
        print(f"{kind}: raw frames  probe {stats(raw.values())} | per seed {list(raw.values())}")
        print(f"{kind}: via mp4     probe {stats(rt.values())} | per seed {list(rt.values())}")
        print(f"{kind}: paired mp4 - raw: {stats(diff)}")
    imp = read_json(os.path.join(root, "video", "data", "starpilot", "import_summary.json")) or {}
    for k in ("decoded_frames_per_s", "kept_frames_per_s", "peak_rss_bytes", "kept_frame_bytes", "wall_s"):
        print(f"import {k}: {imp.get(k)}")


def main():
    root = sys.argv[1]
    if "--report" in sys.argv:
        return report(root)
    raw, mp4, data = (os.path.join(root, p) for p in ("data/starpilot", "video/mp4", "video/data/starpilot"))
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(mp4, split)):
            run("tools/videos.py", "export", "--data", raw, "--split", split, "--out", os.path.join(mp4, split))
    if not os.path.exists(os.path.join(data, "import_summary.json")):
        run("tools/videos.py", "import", os.path.join(mp4, "train"), "--test-src", os.path.join(mp4, "test"),
            "--out", data)
    kinds = [("supervised", "tools/diagnose.py", "supervised-idm"), ("lapo", "lapo.py", "stage1")]
    for kind, script, cmd in kinds[:1 if "--supervised-only" in sys.argv else 2]:
        for seed in SEEDS:  # the pipeline's command lines, on the imported frames
            out = os.path.join(root, "video", f"seed{seed}", kind)
            if probe(out) is None:
                resume = ["--resume"] if os.path.exists(os.path.join(out, "stage1.pt")) else []
                run(script, cmd, "--data", data, "--out", out, "--preset", "small", "--device", "auto", "--seed",
                    str(seed), *resume)
    report(root)


if __name__ == "__main__":
    main()
