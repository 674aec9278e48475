"""Issue 24's round trip: what lossy video costs stage 1. The random-policy starpilot data of deviations.py (collected
at `small`) is exported to H.264 mp4 at the codec's default quality with its action sidecars, imported again (the
same train/test split, kept with --test-src), and stage 1 trains at `small` on it with the paper's modules, 3 seeds,
exactly as deviations.py's `paper` runs train on the raw frames. A queue of resumable pieces, like deviations.py.

    python results/scripts/video_roundtrip.py runs/deviations [--lapo PATH]   # PATH: the lapo.py that trains
    python results/scripts/video_roundtrip.py runs/deviations --report

--lapo: the deviations ran at commit 1675f4a; pass that commit's lapo.py so both sides train with the same code.
"""
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools"), os.path.dirname(os.path.abspath(__file__))]
from deviations import BASE, SEEDS, piece_cmd  # noqa: E402
from pipeline import stats  # noqa: E402

import lapo  # noqa: E402


def tool(*argv):
    print("+ videos.py", " ".join(argv), flush=True)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "videos.py"), *argv], check=True)


def report(root):
    raw = {s: (lapo.read_json(os.path.join(root, f"paper-s{s}", "stage1_summary.json")) or {}).get("probe_acc")
           for s in SEEDS}
    rt = {s: (lapo.read_json(os.path.join(root, f"video-paper-s{s}", "stage1_summary.json")) or {}).get("probe_acc")
          for s in SEEDS}
    diff = [rt[s] - raw[s] for s in SEEDS if rt[s] is not None and raw[s] is not None]
    print(f"raw frames  probe {stats(raw.values())} | per seed {list(raw.values())}")
    print(f"via mp4     probe {stats(rt.values())} | per seed {list(rt.values())}")
    print(f"paired mp4 - raw: {stats(diff)}")
    imp = lapo.read_json(os.path.join(root, "video", "starpilot", "import_summary.json")) or {}
    for k in ("decoded_frames_per_s", "kept_frames_per_s", "peak_rss_bytes", "kept_frame_bytes", "wall_s"):
        print(f"import {k}: {imp.get(k)}")


def main():
    root = sys.argv[1]
    if "--report" in sys.argv:
        return report(root)
    lapo_py = sys.argv[sys.argv.index("--lapo") + 1] if "--lapo" in sys.argv else os.path.join(ROOT, "lapo.py")
    raw, mp4, data = (os.path.join(root, p) for p in ("data/starpilot", "mp4", "video/starpilot"))
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(mp4, split)):
            tool("export", "--data", raw, "--split", split, "--out", os.path.join(mp4, split))
    if not os.path.exists(os.path.join(data, "import_summary.json")):
        tool("import", os.path.join(mp4, "train"), "--test-src", os.path.join(mp4, "test"), "--out", data)
    for seed in SEEDS:
        piece_cmd(lapo_py, os.path.join(root, f"video-paper-s{seed}"), "stage1",
                  ["--preset", "small", "--data", data, "--seed", str(seed), *BASE])
    report(root)


if __name__ == "__main__":
    main()
