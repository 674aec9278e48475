"""Video files in and out of LAPO's data layout (PyAV, i.e. FFmpeg): learn from any footage, watch a policy play.

    python tools/videos.py import SRC --out ROOT/NAME [--stride K] [--test-fraction F | --test-src DIR] [--seed S]
    python tools/videos.py export --data ROOT/GAME --split test --out DIR [--episodes N]
    python tools/videos.py play --checkpoint PATH --episodes N --out DIR [--env GAME] [--max-steps M] [--scale 4]

import: every video under SRC (mp4, webm, gif, mkv, avi, mov) -> ROOT/NAME/{train,test}/<i>.npz, one chunk per video
(cut every 32,768 kept frames), every K-th frame centre-cropped to 64x64, done on each chunk's last frame. The test
split is whole videos. A sidecar clip.actions.npy next to clip.mp4 (one action per decoded frame) becomes 'ta'.
export: a split's episodes -> DIR/<k>.mp4 (+ <k>.actions.npy), which import reads back. play: a policy's first
episode in each of N Procgen envs -> DIR/episode<k>_return<R>.mp4 (cleanRL's --capture-video).
"""
import argparse
import os
import re
import resource
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: lapo.py
import av  # noqa: E402
from av.video.reformatter import VideoReformatter  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import lapo  # noqa: E402

EXTENSIONS = (".mp4", ".webm", ".gif", ".mkv", ".avi", ".mov")
CHUNK = 32768  # kept frames per chunk at most (384 MiB): a longer video becomes several chunks
SIZE, FPS = 64, 15


class Skip(Exception):
    """A video that cannot be imported: one line, and the import goes on without it."""


def fraction(text):
    """argparse type of --test-fraction: a number in (0, 1) (lapo.num has no open upper end)."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}")
    return v


def check_empty(folder, what):
    """Refuse a folder that holds anything but lapo.main's lock: new files must not mix with old ones."""
    if os.path.isdir(folder) and set(os.listdir(folder)) - {lapo.LOCK}:
        raise lapo.LapoError(f"{what} {folder} is not empty; delete it or choose another folder")


# ==== IMPORT: video files -> 64x64 frames, one chunk per video ================================
def find_videos(src):
    """Every video file under src, in natural order (clip2 before clip10)."""
    if not os.path.isdir(src):
        raise lapo.LapoError(f"{src} is not a folder; pass the folder that holds the videos")
    found = [os.path.join(d, f) for d, _, files in os.walk(src) for f in files if f.lower().endswith(EXTENSIONS)]
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)])


def read_actions(video):
    """The sidecar of clip.mp4, clip.actions.npy: one action per decoded frame (int64), or None."""
    path = os.path.splitext(video)[0] + ".actions.npy"
    if not os.path.exists(path):
        return None
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise Skip(f"{os.path.basename(path)} is unreadable ({e})")
    if a.ndim != 1 or a.dtype.kind not in "iu" or (len(a) and (a.min() < 0 or a.max() >= lapo.NUM_ACTIONS)):
        raise Skip(f"{os.path.basename(path)} must hold one integer action in [0, {lapo.NUM_ACTIONS}) per frame")
    return a.astype(np.int64)


def read_video(path, stride, buf, actions=None):
    """Decode `path` keeping every stride-th frame: FFmpeg scales its short side to 64 (area averaging) and the
    centre 64x64 is cropped, so one full-resolution frame is in memory at a time. Kept frames fill buf; yields
    (n, frames decoded so far) whenever buf[:n] is a chunk to write out: when buf is full, and once at the end."""
    decoded = n = 0
    if os.path.getsize(path) == 0:
        raise Skip("empty file")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise Skip("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # decode on all cores
            scaler = VideoReformatter()  # FFmpeg's scaler, set up once (frame.reformat's: per frame, 20x slower)
            for frame in container.decode(stream):
                decoded += 1
                if actions is not None and decoded > len(actions):
                    raise Skip(f"its sidecar holds {len(actions)} actions, the video more frames")
                if (decoded - 1) % stride:
                    continue
                s = SIZE / min(frame.width, frame.height)
                w, h = max(SIZE, round(frame.width * s)), max(SIZE, round(frame.height * s))
                x = scaler.reformat(frame, width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
                buf[n] = x[(h - SIZE) // 2:(h - SIZE) // 2 + SIZE, (w - SIZE) // 2:(w - SIZE) // 2 + SIZE]
                n += 1
                if n == len(buf):
                    yield n, decoded
                    n = 0
    except (av.FFmpegError, OSError) as e:
        raise Skip(f"unreadable ({type(e).__name__}: {e})")
    yield n, decoded


def import_videos(args):
    """Import every video under args.src into args.root (written as <root>.partial, renamed when complete)."""
    root, t0 = args.root, time.time()
    part = f"{root}.partial"
    if os.path.exists(part):
        raise lapo.LapoError(f"{part} holds an interrupted import; delete it and run the same command again")
    check_empty(root, "--out")
    videos = find_videos(args.src)
    held = find_videos(args.test_src) if args.test_src else []  # --test-src: the test split, as given
    if not videos or (args.test_src and not held):
        raise lapo.LapoError(f"no video files ({', '.join(EXTENSIONS)}) under {args.test_src if videos else args.src}")
    if not held and max(1, round(args.test_fraction * len(videos))) >= len(videos):
        raise lapo.LapoError(f"{len(videos)} video(s) under {args.src}: --test-fraction {args.test_fraction} leaves "
                             "none for train (the test split is whole videos); add videos or lower it")
    args.on_interrupt = f"import does not resume: delete {part} (no stage reads it) and run the same command again"
    staged = os.path.join(part, "videos")  # chunks land here; each goes to train/ or test/ once all are read
    os.makedirs(staged)
    buf = np.empty((CHUNK, SIZE, SIZE, 3), np.uint8)  # its pages become resident only as frames fill them
    imported, skipped, decoded_total = [], [], 0
    for i, path in enumerate(videos + held):
        name = os.path.relpath(path, args.src if i < len(videos) else args.test_src)
        chunks, kept, t = [], 0, time.time()
        try:
            actions = read_actions(path)
            for n, decoded in read_video(path, args.stride, buf, actions):
                if n:
                    chunk = {"obs": buf[:n], "done": np.arange(n) == n - 1}  # no window crosses a chunk's end
                    if actions is not None:
                        chunk["ta"] = actions[::args.stride][kept:kept + n]  # the action at each kept frame
                    chunks.append(os.path.join(staged, f"{i}-{len(chunks)}.npz"))
                    lapo.write_atomic(chunks[-1], lambda f: lapo.save_npz(f, chunk))
                    kept += n
            if actions is not None and decoded != len(actions):
                raise Skip(f"its sidecar holds {len(actions)} actions, the video {decoded} frames")
            if kept < 3:
                raise Skip(f"{kept} frame(s) kept with --stride {args.stride}: a window needs 3")
        except Skip as e:
            for c in chunks:
                os.remove(c)
            skipped.append([name, str(e)])
            print(f"import: skipped {name}: {e}", flush=True)
            continue
        decoded_total += decoded
        imported.append({"video": name, "chunks": chunks, "frames": kept, "labels": actions is not None,
                         "held": i >= len(videos)})
        print(f"import {i + 1}/{len(videos) + len(held)} {name}: {decoded} decoded, {kept} kept frames"
              f"{' + actions' if actions is not None else ''} | {decoded / (time.time() - t):.0f} frames/s", flush=True)
    n = len(imported)
    test = {k for k, v in enumerate(imported) if v["held"]}
    n_test = len(test) if held else max(1, round(args.test_fraction * n))
    if n_test >= n or not n_test:
        shutil.rmtree(part)  # made by this call, and nothing in it is of use
        raise lapo.LapoError(f"{n} of {len(videos)} videos could be imported (each skip is printed above): "
                             "they leave none for train or none for test")
    if not held:  # whole videos, drawn with --seed
        test = set(np.random.default_rng(args.seed).choice(n, n_test, replace=False).tolist())
    summary = {"source": os.path.abspath(args.src), "test_source": args.test_src and os.path.abspath(args.test_src),
               "stride": args.stride, "test_fraction": None if held else args.test_fraction,
               "seed": args.seed}
    for split in ("train", "test"):
        folder = os.path.join(part, split)
        mine = [v for k, v in enumerate(imported) if (k in test) == (split == "test")]
        os.makedirs(folder)
        for k, c in enumerate(c for v in mine for c in v["chunks"]):
            os.rename(c, os.path.join(folder, f"{k}.npz"))
        labeled = sum(v["labels"] for v in mine)
        if 0 < labeled < len(mine):
            print(f"note: {labeled} of {len(mine)} {split} videos have actions; lapo.load_split uses them only when "
                  "all do", flush=True)
        summary[split] = {"videos": len(mine), "frames": sum(v["frames"] for v in mine), "labels": labeled == len(mine),
                          "labeled_videos": labeled, "files": [v["video"] for v in mine]}
    os.rmdir(staged)
    wall, kept_total = time.time() - t0, sum(v["frames"] for v in imported)
    summary.update({"imported": n, "skipped": len(skipped), "skipped_videos": skipped, "wall_s": wall,
                    "decoded_frames": decoded_total, "decoded_frames_per_s": decoded_total / wall,
                    "kept_frames_per_s": kept_total / wall,
                    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # (Linux: KiB)
                    "kept_frame_bytes": kept_total * SIZE * SIZE * 3})
    lapo.write_json(os.path.join(part, "import_summary.json"), summary)  # (not printed: it lists every video)
    os.rename(part, root)  # (root is absent or an empty folder)
    print(f"import: {n} videos imported ({n - n_test} train, {n_test} test), {len(skipped)} skipped -> {root} | "
          f"{kept_total} frames, {decoded_total / wall:.0f} decoded frames/s | peak memory "
          f"{summary['peak_rss_bytes'] / 2 ** 20:.0f} MiB for {summary['kept_frame_bytes'] / 2 ** 20:.0f} MiB of "
          "frames", flush=True)
    return summary


# ==== EXPORT AND PLAY: frames -> H.264 mp4 files ================================================
def write_mp4(path, frames, scale=1):
    """uint8 (H, W, 3) frames -> H.264 mp4 at 15 fps (yuv420p: plays everywhere), each pixel a scale x scale block."""
    def write(f):
        with av.open(f, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=FPS)
            stream.height, stream.width = frames[0].shape[0] * scale, frames[0].shape[1] * scale
            stream.pix_fmt = "yuv420p"
            for x in frames:
                x = np.repeat(np.repeat(x, scale, 0), scale, 1)  # nearest neighbour: sharp pixels
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(x), format="rgb24")))
            container.mux(stream.encode())  # flush the encoder's delayed frames
    try:
        lapo.write_atomic(path, write)  # (removes its temporary file on any error)
    except av.FFmpegError as e:
        raise lapo.LapoError(f"could not encode {path} ({e}); nothing was written")


def export(args):
    """Write each episode of a split (a segment between breaks, 3 frames or more) as <k>.mp4 (+ <k>.actions.npy)."""
    check_empty(args.out, "--out")
    data = lapo.load_split(args.data, args.split)
    ends = np.flatnonzero(data.breaks) + 1  # episode ends and chunk ends: where no window may cross
    written = short = 0
    for s, e in zip(np.r_[0, ends[:-1]], ends):
        if e - s < 3:  # no window in it, and import would skip it
            short += 1
        elif args.episodes is None or written < args.episodes:
            path = os.path.join(args.out, str(written))
            if data.ta is not None:
                lapo.write_atomic(f"{path}.actions.npy", lambda f: np.save(f, data.ta[s:e].numpy()))
            write_mp4(f"{path}.mp4", data.obs[s:e].numpy())
            written += 1
    print(f"export: {written} episodes -> {args.out} ({short} shorter than 3 frames left out)", flush=True)


@torch.no_grad()
def play(args):
    """Run a saved policy in N envs; each env's first episode (cut at --max-steps) -> episode<k>_return<R>.mp4."""
    check_empty(args.out, "--out")
    device = lapo.get_device(args)
    agent, ck = lapo.load_policy(args.checkpoint, device)
    game = args.env or ck.get("game")
    lapo.check_game(game)
    torch.manual_seed(args.seed)  # the policy's sampled actions: same seed, same episodes
    envs, n = lapo.Envs(game, args.episodes, args.seed), args.episodes
    obs, frames, results, steps = envs.reset(), [[] for _ in range(n)], {}, 0
    while len(results) < n:
        act, _ = agent.act(torch.from_numpy(obs).to(device))
        for e in range(n):
            if e not in results:
                frames[e].append(obs[e].copy())  # the frame each action was taken on
        obs, _, _, finished = envs.step(act)
        steps += 1
        ended = {e: r for e, r in finished if e not in results}
        if args.max_steps and steps >= args.max_steps:  # cut: an unfinished episode counts its return so far
            ended.update({e: float(envs.ret[e]) for e in range(n) if e not in results and e not in ended})
        for e, r in sorted(ended.items()):
            path = os.path.join(args.out, f"episode{e}_return{r:.1f}.mp4")
            write_mp4(path, frames[e], args.scale)
            print(f"play: {path}: return {r:.1f}, {len(frames[e])} frames", flush=True)
            results[e], frames[e] = (path, r), None
    envs.close()
    return [results[e] for e in range(n)]


def parse(argv=None):
    p = lapo.Parser(description=__doc__.split("\n")[0])  # its errors are LapoErrors: one line, exit 2
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="video files -> ROOT/NAME/{train,test}/<i>.npz")
    imp.add_argument("src", help="folder searched recursively for video files")
    imp.add_argument("--out", required=True, help="ROOT/NAME: the data folder to create (lapo.py's --data)")
    imp.add_argument("--stride", type=lapo.POS, default=1, help=f"keep every K-th frame (default 1) [{lapo.POS.range}]")
    imp.add_argument("--test-fraction", type=fraction, default=0.1, help="share of the videos held out (whole videos, "
                     "at least one) (default 0.1) [in (0, 1)]")
    imp.add_argument("--seed", type=lapo.SEED, default=0, help=f"which videos are held out [{lapo.SEED.range}]")
    imp.add_argument("--test-src", default=None, help="a folder of videos that is the test split, as it is (instead "
                     "of --test-fraction of SRC's): keeps an exported split")
    imp.set_defaults(func=import_videos)
    exp = sub.add_parser("export", help="a split's episodes -> DIR/<k>.mp4 (+ <k>.actions.npy)")
    exp.add_argument("--data", required=True, help="ROOT/GAME of the layout ROOT/GAME/{train,test}/<i>.npz")
    exp.add_argument("--split", choices=("train", "test"), default="test")
    exp.add_argument("--out", required=True, help="an empty or new folder")
    exp.add_argument("--episodes", type=lapo.POS, default=None, help=f"the first N only [{lapo.POS.range}]")
    exp.set_defaults(func=export)
    ply = sub.add_parser("play", help="a saved policy's episodes -> DIR/episode<k>_return<R>.mp4")
    ply.add_argument("--checkpoint", required=True, help="a policy checkpoint (expert.pt, decoded_*.pt, online.pt)")
    ply.add_argument("--episodes", type=lapo.ENVS, required=True, help=f"envs run in parallel, one episode each "
                     f"[{lapo.ENVS.range}]")
    ply.add_argument("--out", required=True, help="an empty or new folder")
    ply.add_argument("--env", default=None, help="Procgen game (default: the checkpoint's)")
    ply.add_argument("--max-steps", type=lapo.POS, default=None, help=f"cut episodes here [{lapo.POS.range}]")
    ply.add_argument("--seed", type=lapo.SEED, default=0, help=f"levels and sampled actions [{lapo.SEED.range}]")
    ply.add_argument("--scale", type=lapo.num(int, 1, 16), default=4, help="pixel upscaling (default 4) [in [1, 16]]")
    ply.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    ply.set_defaults(func=play)
    args = p.parse_args(argv)
    if args.cmd == "import":  # lapo.main locks args.out: for import its parent, as ROOT/NAME appears only at the end
        args.root, args.out = args.out, os.path.dirname(os.path.abspath(args.out))
    return args


def main(argv=None):
    lapo.main(argv, parse)


if __name__ == "__main__":
    main()
