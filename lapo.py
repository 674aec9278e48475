"""LAPO: Learning to Act without Actions (Schmidt & Jiang, ICLR 2024, arXiv 2312.10812).

One file in the paper's order, each part under a `# ====` banner: the flag table FLAGS (every hyperparameter, at its
paper, small and tiny values); utilities (seeding, autocast, `preprocess`, `optimize`); data (`Envs`, `collect`,
`load_split` -> `FrameData`: windows inside one episode); networks (`IDM` with its `VectorQuantizer`, the `FDM` U-Net,
`Decoder`, agents); stage 1 (its loss: `build_stage1.train_step`); stage 2 (`build_stage2.train_step`); stage 3
(`stage3_offline`; `ppo`, `stage3_online`); evaluation; several ranks (`ddp_start`: stages 1 and 2 under torchrun).
Last, the plumbing: lock, writes, checkpoints, metrics, main.

    python lapo.py collect --env bigfish --out data            # video, its actions recorded (stages 1-2 ignore them)
    python lapo.py stage1  --data data/bigfish --out runs/bigfish   # latent IDM + FDM, no actions used
    python lapo.py stage2  --data data/bigfish --out runs/bigfish   # latent policy pi(o_t) -> z_t
    python lapo.py stage3  --mode offline --labels 256 --data data/bigfish --out runs/bigfish
    python lapo.py stage3  --mode online --out runs/bigfish         # PPO with the RL+SL policy
    python tools/pipeline.py --env bigfish --preset small --out runs/demo  # all of it + baselines, results.md
    python tools/bench.py --preset paper                       # throughput of every stage on this machine
"""
import argparse
import contextlib
import copy
import datetime
import fcntl
import hashlib
import importlib.util
import io
import json
import math
import os
import sys
import tempfile
import time
import uuid
import warnings
import zipfile
import zlib

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ==== CONFIGURATION: the paper's hyperparameters, every flag in one table ====================
GAMES = ("bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
         "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot")
ACTION_NAMES = ("LEFT-DOWN", "LEFT", "LEFT-UP", "DOWN", "NOOP", "UP", "RIGHT-DOWN", "RIGHT", "RIGHT-UP",
                "D", "A", "W", "S", "Q", "E")
NUM_ACTIONS = len(ACTION_NAMES)
# Mean episode return of a random policy and of the authors' expert data (easy mode), for normalization.
SCORES = {"bigfish": (0.874, 36.336), "bossfight": (0.046, 11.634), "caveflyer": (2.597, 9.184),
          "chaser": (0.663, 9.956), "climber": (2.224, 10.234), "coinrun": (2.705, 9.933),
          "dodgeball": (0.613, 13.487), "fruitbot": (-2.533, 29.925), "heist": (3.076, 9.685),
          "jumper": (3.411, 8.460), "leaper": (2.511, 7.408), "maze": (4.273, 9.969),
          "miner": (1.251, 11.893), "ninja": (2.560, 9.475), "plunder": (4.321, 11.461), "starpilot": (1.525, 66.986)}

# Every flag of every command, in one table. P(paper, small, tiny) is a flag's value under each preset: `paper` is the
# authors' release (for a GPU), `small` is sized for an hour on a 2-core CPU with the one module deviation that
# measurably helps there (README 'Deviations'), `tiny` takes seconds (tests). Explicit flags win; see `--help`.
PRESETS = ("paper", "small", "tiny")

class P(tuple):
    def __new__(cls, paper, small, tiny):
        return super().__new__(cls, (paper, small, tiny))

def num(kind, lo=None, hi=None, lo_open=False):
    """argparse type: an int or float in [lo, hi] ((lo, hi] with lo_open), checked when the arguments are parsed."""
    what = "an integer" if kind is int else "a number"
    rng = f"{'>' if lo_open else '>='} {lo}" if hi is None else f"in {'(' if lo_open else '['}{lo}, {hi}]"
    rng = "finite" if lo is None and hi is None else rng

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} {rng}, got {text!r}")
        if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {what} {rng}, got {text}")
        return v
    parse.range, parse.bounds = rng, (kind, lo, hi, lo_open)  # bounds: for tests that try every flag's edges
    return parse

def int_list(text):
    """--labels: comma-separated positive integers, e.g. 16,64,256."""
    try:
        vals = sorted({int(x) for x in text.split(",")})
    except ValueError:
        vals = []
    if not vals or vals[0] < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 (e.g. 16,64,256), got {text!r}")
    return vals

POS, NONNEG, SEED = num(int, 1), num(int, 0), num(int, 0, 2 ** 31 - 1)
PROB, RATE, SCALE = num(float, 0, 1), num(float, 0, 10, lo_open=True), num(float, 0, 64, lo_open=True)
NONNEG_F, BIT = num(float, 0), {"choices": (0, 1)}
ENVS = num(int, 1, 4096)  # Procgen envs: 4,096 take about 1 GiB; far more crash Procgen itself, below Python
FLAGS = []  # (option strings, commands, type, default, help, other argparse keywords)

def flag(names, cmds, type=None, default=None, help="", **kw):
    FLAGS.append((names.split(), cmds.split(), type, default, help, kw))

ALL, TRAIN = "collect stage1 stage2 stage3 expert eval", "stage1 stage2"
PPO, EVAL = "stage3 expert", "stage3 expert eval"  # (stage3's PPO flags are --mode online's)
flag("--preset", ALL, None, "paper", "paper: the authors' release (GPU); small: an hour on a CPU; tiny: seconds",
     choices=PRESETS)
flag("--seed", ALL, SEED, 0, "seed of everything; same seed, same result (to float rounding)")
flag("--device", ALL, None, "auto", "auto: CUDA when present", choices=("auto", "cpu", "cuda"))
flag("--torch-deterministic", ALL, int, 1, "1: on CUDA too, stages 1-2 repeat and resume exactly; 0: CUDA's own", **BIT)
flag("--amp", ALL, None, "off", "bf16 autocast; auto: on for CUDA and CPUs with bf16 units (small: off, as bf16 "
     "found the action no more often; results log)", choices=("auto", "on", "off"))
flag("--out", "collect", None, "data", "data root: writes <out>/<env>/{train,test}/<i>.npz")
flag("--out", "stage1 stage2 stage3", None, "runs/lapo", "run folder (checkpoints, metrics.jsonl, summaries)")
flag("--out", "expert", None, "runs/expert", "run folder")
flag("--resume", "stage1 stage2 stage3 expert", None, False, "continue the checkpoint in --out", action="store_true")
flag("--track", "stage1 stage2 stage3 expert", None, False, "also log metrics and config to Weights & Biases",
     action="store_true")
flag("--wandb-project", "stage1 stage2 stage3 expert", None, "lapo", "W&B project, with --track")
flag("--wandb-entity", "stage1 stage2 stage3 expert", None, None, "W&B team or user, with --track")
# ---- data, and the training loop of stages 1 and 2
flag("--data", TRAIN, None, None, "a game folder <root>/<game> of the layout <root>/<game>/{train,test}/<i>.npz",
     required=True)
flag("--data", "stage3", None, None, "offline: the game folder with action-labeled train/test chunks")
flag("--max-chunks", "stage1 stage2 stage3", POS, None, "load at most this many train chunks")
flag("--stage1-steps", "stage1", POS, P(50_000, 3000, 30), "training steps")
flag("--stage2-steps", "stage2", POS, P(60_000, 2000, 30), "training steps")
flag("--batch-size", TRAIN, POS, P(128, 64, 16), "batch")
flag("--lr", "stage1", RATE, P(3e-4, 1e-3, 1e-3), "AdamW peak learning rate (higher for short runs)")
flag("--lr", "stage2", RATE, P(2e-4, 5e-4, 5e-4), "AdamW peak learning rate")
flag("--max-grad-norm", "stage1", NONNEG_F, 2.0, "gradient norm clip, 0: none")
flag("--max-grad-norm", "stage2", NONNEG_F, 0.0, "gradient norm clip, 0: none (the authors clip stage 1 only)")
flag("--warmup2", "stage2", NONNEG, 1000, "LR warm-up steps (0.01x -> 1x)")
flag("--impala-scale", TRAIN, SCALE, P(4, 1, 0.25), "IMPALA CNN width multiplier")
flag("--eval-every", TRAIN, POS, P(500, 500, 15), "steps between test loss/probe evals")
flag("--eval-windows", TRAIN, POS, P(1024, 512, 64), "test windows for the test loss")
flag("--ckpt-every", TRAIN, POS, P(2000, 500, 15), "steps between atomic checkpoints")
flag("--log-every", TRAIN, POS, 50, "steps between progress lines")
# ---- stage 1: the IDM, its VQ bottleneck, the FDM
flag("--latent-dim", "stage1", POS, 128, "IDM latent size")
flag("--code-dim", "stage1", POS, 16, "dims per quantized vector (128/16 = 8 vectors)")
flag("--num-codebooks", "stage1", POS, 2, "codebooks, each for an equal share of vectors")
flag("--codebook-size", "stage1", POS, 64, "codes per codebook")
flag("--vq-decay", "stage1", num(float, 0, 0.99999), P(0.999, 0.99, 0.9), "EMA decay of the codebooks (small: "
     "faster, for 3k steps instead of 50k)")
flag("--commit-weight", "stage1", NONNEG_F, 0.05, "commitment loss weight")
flag("--no-vq", "stage1", None, True, "ablation: no VQ bottleneck", action="store_false", dest="vq")
flag("--fdm-width", "stage1", num(int, 2), P(24, 8, 4), "U-Net base width")
flag("--fdm-residual", "stage1", int, P(0, 1, 1), "1: the FDM predicts o_t + change, not o_{t+1}", **BIT)
flag("--probe-windows", "stage1", num(int, 4), P(4096, 2048, 256), "labeled test windows for the probe (fit on half)")
# ---- stage 3: offline decoding, online decoding
flag("--mode", "stage3", None, None, "offline: decoder from a few labeled frames; online: PPO in the env (RL+SL)",
     choices=("offline", "online"), required=True)
flag("--labels", "stage3", int_list, P([16, 64, 256, 1024], [16, 64, 256, 1024], [16, 64]), "offline: labeled "
     "frames, comma-separated to sweep")
flag("--decoder-steps", "stage3", POS, P(2000, 1000, 50), "offline decoder training steps")
flag("--baseline", "stage3", None, "none", "bc: also BC from scratch on the labels", choices=("none", "bc"))
flag("--bc-steps", "stage3", POS, P(2000, 500, 50), "BC-from-scratch training steps")
flag("--no-sl", "stage3", None, False, "online ablation: decoder trained by RL, no supervised step",
     action="store_true")
flag("--schedule-scale", "stage3", num(float, 0, 100, lo_open=True), P(1.0, 0.25, 0.01), "online: scale the LR "
     "and decoder schedules (small: SL until 100k frames, RL head from 8.75k)")
# ---- environments, collection and PPO (the expert, PPO from scratch, online decoding)
flag("--env", "collect expert", None, None, f"Procgen game: {', '.join(GAMES)}", required=True)
flag("--env", "stage3 eval", None, None, "game, when not stage 1's data folder's name (eval: the policy's game)")
flag("--policy", "collect", None, "random", "'random' or a policy checkpoint saved by this script")
flag("--frames", "collect", POS, P(2_621_440, 65_536, 2048), "train frames (paper: 80 chunks, as the authors')")
flag("--test-frames", "collect", POS, P(65_536, 8192, 1024), "test-split frames")
flag("--chunk-len", "collect", POS, 32768, "frames per train chunk (the authors': 32,768)")
flag("--test-chunk-len", "collect", POS, 4096, "frames per test chunk (the authors': 4,096)")
flag("--num-envs", "collect", ENVS, P(64, 64, 8), "parallel envs; a chunk holds one segment per env")
flag("--frames", "stage3", POS, P(4_000_000, 131_072, 2048), "online: env frames")
flag("--frames", "expert", POS, P(25_000_000, 786_432, 2048), "env frames (the paper's PPO-from-scratch baseline: "
     "4M)")
flag("--num-envs", PPO, ENVS, P(64, 32, 8), "parallel envs")
flag("--num-steps", "stage3", POS, P(64, 64, 32), "steps per env per rollout")
flag("--num-steps", "expert", POS, P(256, 128, 32), "steps per env per rollout")
flag("--lr", "stage3", RATE, 1e-2, "online: peak Adam learning rate (each parameter group ramps to a share of it)")
flag("--lr", "expert", RATE, 5e-4, "Adam learning rate, annealed linearly to 0")
flag("--ent-coef", "stage3", NONNEG_F, 0.0025, "entropy bonus")
flag("--ent-coef", "expert", NONNEG_F, 0.01, "entropy bonus")
flag("--impala-scale", "expert", SCALE, P(1, 0.5, 0.25), "IMPALA width multiplier (cleanRL: 1)")
flag("--num-minibatches", PPO, POS, 8, "minibatches per epoch of a PPO update")
flag("--update-epochs", PPO, POS, 3, "epochs over each rollout")
flag("--gamma", PPO, PROB, 0.999, "discount (Procgen episodes are long)")
flag("--gae-lambda", PPO, PROB, 0.95, "GAE lambda")
flag("--clip-coef", PPO, num(float, 0, 10, lo_open=True), 0.2, "policy and value clip range")
flag("--vf-coef", PPO, NONNEG_F, 0.5, "value loss weight")
flag("--max-grad-norm", PPO, num(float, 0, lo_open=True), 0.5, "gradient norm clip")
flag("--ckpt-every-updates", PPO, POS, 10, "updates between atomic checkpoints")
# ---- evaluation in the environment
flag("--eval-episodes --episodes", EVAL, POS, P(64, 512, 2), "episodes per evaluation (small: starpilot's "
     "per-episode std of 2-3 leaves +-0.3 of noise on a mean over 64)")
flag("--eval-max-steps", EVAL, POS, P(None, None, 200), "cut evaluation after this many env steps")
flag("--greedy", EVAL, None, False, "act with argmax instead of sampling", action="store_true")
flag("--expert-return", EVAL, num(float), None, "normalize against this expert return instead of the paper's")
flag("--checkpoint", "eval", None, None, "a policy .pt written by this script", required=True)

def preset_defaults(cmd, preset):
    """{flag: value} of one command's flags under a preset, for tools."""
    i = PRESETS.index(preset)
    return {kw.get("dest", names[0][2:].replace("-", "_")): d[i] if isinstance(d, P) else d
            for names, cmds, _, d, _, kw in FLAGS if cmd in cmds}

class LapoError(Exception):
    """A user-facing error: printed as one line by main(), never as a traceback."""

# ==== UTILITIES the method uses: seeding, devices, bf16 autocast, preprocessing, optimizer steps ====
def seed_everything(seed):
    np.random.seed(seed)
    torch.manual_seed(seed)

def get_device(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        raise LapoError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    cuda = args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()
    if cuda:  # deterministic kernels (lapo's CPU runs repeat without); cuBLAS reads this once, so set with 0 too
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(bool(getattr(args, "torch_deterministic", 1)), warn_only=True)
    return torch.device("cuda" if cuda else "cpu")

def bf16_fast(device):
    """Does this device run bf16 fast: a GPU or a CPU with bf16 units (Ampere or later; AMX or AVX512-BF16)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()

def use_amp(args, device):
    """bf16 autocast: --amp auto turns it on where the hardware runs it fast."""
    return bf16_fast(device) if args.amp == "auto" else args.amp == "on"

def autocast(device, enabled):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)

def preprocess(frames):
    """uint8 frames (B, H, W, C) or windows (B, K, H, W, C) -> float (B, K*C, H, W) in [-0.5, 0.5], on the device."""
    x = frames.float().div_(255.0).sub_(0.5)
    if x.dim() == 5:
        b, k, h, w, c = x.shape
        return x.permute(0, 1, 4, 2, 3).reshape(b, k * c, h, w).contiguous(memory_format=torch.channels_last)
    return x.permute(0, 3, 1, 2)  # a view of NHWC memory, i.e. already channels_last

@torch.no_grad()
def in_batches(fn, items, device, amp, batch=256):
    """fn over consecutive batches of `items` under autocast, without gradients -> outputs concatenated on the CPU."""
    out = []
    for i in range(0, len(items), batch):
        with autocast(device, amp):
            out.append(fn(items[i:i + batch]).cpu())
    return torch.cat(out)

def optimize(opt, loss, params=None, max_norm=math.inf):
    """One optimizer step on `loss`; with `params`, clip their gradient norm first. -> the norm (or None)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = None if params is None else nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    return norm

@contextlib.contextmanager
def seeded(seed):
    """Draw from torch's random streams seeded with `seed`, then put every stream back (the GPU's too): a side job
    (the probe, a decoder's initial weights, evaluation) never shifts the training's own random stream."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed)
        yield

def fmt_time(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

# ==== DATA: Procgen environments, collection in the authors' layout, loading, windows =========
def check_game(game):
    if game not in GAMES:
        raise LapoError(f"unknown game {game!r}; choose one of: {', '.join(GAMES)}")

class Envs:
    """Procgen vector env (easy mode, full level distribution) that also tracks episode returns."""

    def __init__(self, game, num_envs, seed):
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gym 0.26 prints a deprecation banner on import
            try:
                from procgen import ProcgenEnv
            except ImportError:
                raise LapoError("procgen is not installed: pip install -r requirements.txt") from None
        self.env = ProcgenEnv(num_envs=num_envs, env_name=game, distribution_mode="easy",
                              num_levels=0, start_level=0, rand_seed=int(seed) % 2**31)
        self.num_envs, self.ret = num_envs, np.zeros(num_envs, np.float64)

    def reset(self):
        return self.env.reset()["rgb"]

    def step(self, actions):
        """-> obs, reward, done, finished (env, return) pairs. done[i]: env i's episode ended with this step, and
        obs[i] is already the first frame of its next episode (Procgen resets by itself)."""
        obs, rew, done, _ = self.env.step(np.asarray(actions, dtype=np.int32))
        self.ret += rew
        finished = [(i, float(self.ret[i])) for i in np.flatnonzero(done)]
        self.ret[done] = 0.0
        return obs["rgb"], rew.astype(np.float32), done.astype(bool), finished

    def close(self):
        self.env.close()

def collect(args):
    """Record rollouts in the authors' layout <out>/<game>/{train,test}/<i>.npz: per chunk, each env's segment in
    time order. Per frame i: obs (64,64,3) uint8, ta (action taken), rewards, values (the policy's estimate; 0 if
    random), ep_returns (the return where an episode ended, else NaN), done (obs[i+1] does not continue obs[i]'s
    episode: no window may cross it)."""
    check_game(args.env)
    device, agent = get_device(args), None
    if args.policy != "random":
        agent, meta = load_policy(args.policy, device)
        if meta.get("game") not in (None, args.env):
            raise LapoError(f"{args.policy} was trained on {meta['game']}, not {args.env}")
    amp, summaries = use_amp(args, device), {}
    root = os.path.join(args.out, args.env)
    part = f"{root}.partial"  # written here and renamed to root once complete: no stage reads half a collection
    if os.path.exists(part):
        raise LapoError(f"{part} holds an interrupted collection; delete it and run the same command again")
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise LapoError(f"{root} already exists and is not an empty folder; delete it or choose another --out")
    args.on_interrupt = (f"collection does not resume: its chunks so far are in {part}, which no stage reads; delete "
                         "it and run the same command again")
    for split, frames, seed in (("train", args.frames, args.seed), ("test", args.test_frames, args.seed + 10_000)):
        folder = os.path.join(part, split)
        os.makedirs(folder, exist_ok=True)
        chunk_len = args.chunk_len if split == "train" else args.test_chunk_len
        envs = Envs(args.env, args.num_envs, seed)
        obs = envs.reset()
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)  # the policy's action sampling: same seed, same data
        t0, done_frames, ep_returns, i = time.time(), 0, [], 0
        while done_frames < frames:
            steps = max(1, min(chunk_len, frames - done_frames) // args.num_envs)
            buf = {k: [] for k in ("obs", "ta", "rewards", "done", "values", "ep_returns")}
            for _ in range(steps):
                if agent is None:
                    act, val = rng.integers(0, NUM_ACTIONS, args.num_envs), np.zeros(args.num_envs, np.float32)
                else:
                    act, val = agent.act(torch.from_numpy(obs).to(device), amp=amp)
                nxt, rew, done, finished = envs.step(act)
                epr = np.full(args.num_envs, np.nan, np.float32)
                for e, ret in finished:
                    epr[e] = ret
                    ep_returns.append(ret)
                for k, v in zip(buf, (obs, act, rew, done, val, epr)):
                    buf[k].append(np.asarray(v))
                obs = nxt
            # (steps, envs, ...) -> (envs, steps, ...): each env's segment contiguous in time order
            chunk = {k: np.stack(v, 1).reshape(-1, *np.asarray(v[0]).shape[1:]) for k, v in buf.items()}
            chunk["done"].reshape(args.num_envs, steps)[:, -1] = True  # segment ends: no window may cross
            chunk["ta"] = chunk["ta"].astype(np.int64)
            write_atomic(os.path.join(folder, f"{i}.npz"), lambda f: save_npz(f, chunk))
            done_frames += len(chunk["obs"])
            i += 1
            el = time.time() - t0
            mean = f"{np.mean(ep_returns[-100:]):.2f}" if ep_returns else "n/a"
            print(f"collect {args.env}/{split}: {done_frames}/{frames} frames | {done_frames / el:.0f} frames/s | "
                  f"{len(ep_returns)} episodes, mean return {mean} | "
                  f"eta {fmt_time(el / done_frames * (frames - done_frames))}", flush=True)
        envs.close()
        summaries[split] = {"frames": done_frames, "chunks": i, "episodes": len(ep_returns),
                            "mean_return": float(np.mean(ep_returns)) if ep_returns else None,
                            "frames_per_s": done_frames / (time.time() - t0)}
    write_summary(part, "collect", {"game": args.env, "policy": args.policy, **summaries})
    os.rename(part, root)  # (root is absent or an empty folder)
    return root

def _npz_member(z, key):
    """Open array `key` of an open .npz (zip) and read its .npy header. -> (file at the data, shape, fortran, dtype)"""
    f, fmt = z.open(f"{key}.npy"), np.lib.format  # (public readers: numpy 2.5 dropped _read_array_header)
    shape, fortran, dtype = (fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0)(f)
    return f, shape, fortran, dtype

class FrameData:
    """All frames of one split in ONE contiguous uint8 array (N, 64, 64, 3); windows are gathered by index.
    centres: every t whose window (o_{t-1}, o_t, o_{t+1}) stays inside one episode and one chunk."""

    def __init__(self, obs, done, ta=None, chunk_ends=(), name="data", game=None, identity=None):
        self.obs = torch.from_numpy(obs) if isinstance(obs, np.ndarray) else obs
        self.name, self.game, self.identity, n = name, game, identity, len(obs)
        brk = np.asarray(done, bool).copy()
        brk[list(chunk_ends) + [-1]] = True  # chunk ends and the last frame end windows too
        ok, self.breaks = np.zeros(n, bool), brk  # breaks[i]: obs[i + 1] does not continue obs[i]
        ok[1:-1] = ~brk[:-2] & ~brk[1:-1]  # o_{t-1}->o_t and o_t->o_{t+1} are both real transitions
        self.centres = torch.from_numpy(np.flatnonzero(ok))
        self.ta = None if ta is None else torch.as_tensor(np.asarray(ta), dtype=torch.int64)
        if len(self.centres) == 0:
            raise LapoError(f"{name}: no window of 3 consecutive frames inside an episode; the data is too short")

    def __len__(self):
        return len(self.obs)

    def to(self, device):
        """Move the uint8 frames to the device when they fit there with room to spare (at most half its free memory;
        12 KiB per frame, the paper's 2.6M frames are 32 GB). Otherwise they stay in host memory: batches move."""
        if device.type == "cuda":
            torch.cuda.empty_cache()  # memory cached for an earlier stage's freed tensors counts as free
            if self.obs.numel() <= torch.cuda.mem_get_info(device)[0] // 2:
                self.obs, self.centres = self.obs.to(device), self.centres.to(device)
        return self

    def sample(self, n, gen):
        pick = torch.randint(len(self.centres), (n,), generator=gen)
        return self.centres[pick.to(self.centres.device)]

    def windows(self, centres, device):
        """(B,) centre indices -> uint8 (B, 3, H, W, C) on device, one gather, no Python loop."""
        idx = centres.to(self.obs.device)[:, None] + torch.arange(-1, 2, device=self.obs.device)
        return self.obs[idx].to(device, non_blocking=True)

    def labels(self, centres):
        return None if self.ta is None else self.ta[centres.cpu()]

def chunk_paths(folder, split, max_chunks=None):
    """The chunk files <folder>/<split>/<i>.npz in integer order (the first max_chunks), checked by name only."""
    if not os.path.isdir(folder):
        raise LapoError(f"data folder {folder} not found; create it with `python lapo.py collect --env GAME --out DIR` "
                        "and pass --data DIR/GAME")
    d = os.path.join(folder, split)
    names = [f for f in os.listdir(d) if f.endswith(".npz")] if os.path.isdir(d) else []
    if not names:
        raise LapoError(f"no {split} chunks (*.npz) in {d}; --data must point at <root>/<game> of the layout "
                        "<root>/<game>/{train,test}/<i>.npz")
    try:
        names.sort(key=lambda f: int(f[:-4]))
    except ValueError:
        raise LapoError(f"chunk names in {d} must be integers (0.npz, 1.npz, ...)")
    same = [(a, b) for a, b in zip(names, names[1:]) if int(a[:-4]) == int(b[:-4])]
    if same:
        raise LapoError(f"{d}: {same[0][0]} and {same[0][1]} name the same chunk number; remove or rename one")
    return [os.path.join(d, f) for f in names[:max_chunks]]

def data_identity(paths):
    """What a run trained on, cheaply: the chunks' names and sizes (recorded in its config; --resume compares it)."""
    chunks = json.dumps([[os.path.basename(p), os.path.getsize(p)] for p in paths])
    return f"{len(paths)} chunks, {hashlib.sha1(chunks.encode()).hexdigest()[:12]}"

def data_game(folder):
    game = os.path.basename(os.path.normpath(folder))
    return game if game in GAMES else None

CORRUPT = (zipfile.BadZipFile, zlib.error, KeyError, ValueError, OSError, EOFError)  # what a damaged .npz raises

def load_split(folder, split, max_chunks=None, rank=0, ranks=1):
    """Load <folder>/<split>/<i>.npz into a FrameData, memory ~ raw frame bytes (rank r: chunks r, r + ranks, ...)"""
    listed = chunk_paths(folder, split, max_chunks)[rank::ranks]
    d = os.path.dirname(listed[0])
    kept = []  # (path, frames, has actions, has done) of every chunk that holds frames
    for p in listed:
        try:  # every array's .npy header, checked against obs before any frame is read
            with zipfile.ZipFile(p) as z:
                head = {}
                for key in ("obs", "ta", "done"):
                    if key == "obs" or f"{key}.npy" in z.namelist():
                        f, *head[key] = _npz_member(z, key)
                        f.close()
        except CORRUPT as e:
            raise LapoError(f"corrupt chunk {p} ({type(e).__name__}: {e}); delete it or re-run collect")
        shape, fortran, dtype = head["obs"]
        if len(shape) != 4 or shape[1:] != (64, 64, 3) or dtype != np.uint8 or fortran:
            raise LapoError(f"{p}: obs must be uint8 (N, 64, 64, 3) in C order, found {dtype} {shape}")
        for key, kinds, what in (("ta", "iu", "integer action indices"), ("done", "biu", "bool (or 0/1)")):
            if key in head and (head[key][0] != shape[:1] or head[key][2].kind not in kinds):
                raise LapoError(f"{p}: '{key}' must be {what} of shape ({shape[0]},), one per frame of obs; found "
                                f"{head[key][2]} {head[key][0]}")
        if shape[0] == 0:
            print(f"note: {p} holds no frames; skipped", flush=True)
            continue
        kept.append((p, shape[0], "ta" in head, "done" in head))
    if not kept:
        raise LapoError(f"the chunks in {d} hold no frames")
    paths, sizes, labeled, dones = zip(*kept)
    has_ta = all(labeled)
    if any(labeled) and not has_ta:
        print(f"note: only {sum(labeled)} of {len(labeled)} chunks in {d} have actions 'ta'; the split is used "
              "without labels", flush=True)
    if not all(dones):
        print(f"note: {len(dones) - sum(dones)} of {len(dones)} chunks in {d} have no 'done' arrays: their episode "
              "ends are unknown, so windows may cross them (only chunk ends are respected)", flush=True)
    n = sum(sizes)
    obs = np.empty((n, 64, 64, 3), np.uint8)  # one allocation; each chunk's bytes are streamed into it
    done = np.zeros(n, bool)
    ta = np.zeros(n, np.int64) if has_ta else None
    ends, o = [], 0
    for p, s in zip(paths, sizes):
        try:
            with np.load(p) as z:
                with _npz_member(z.zip, "obs")[0] as f:  # obs streamed straight into its place, 1 MiB at a time
                    view, got = memoryview(obs[o:o + s]).cast("B"), 0  # (no copy of the chunk)
                    while got < len(view):
                        n = f.readinto(view[got:got + (1 << 20)])
                        if not n:
                            raise EOFError("chunk ends early")
                        got += n
                if "done" in z.files:  # the small arrays through np.load
                    done[o:o + s] = z["done"]
                if ta is not None:
                    ta[o:o + s] = z["ta"]
        except CORRUPT as e:
            raise LapoError(f"corrupt chunk {p} ({type(e).__name__}); delete it or re-run collect")
        o += s
        ends.append(o - 1)
    if ta is not None and (ta.min() < 0 or ta.max() >= NUM_ACTIONS):
        raise LapoError(f"{d}: actions 'ta' must lie in [0, {NUM_ACTIONS})")
    return FrameData(obs, done, ta, ends, name=f"{folder}/{split}", game=data_game(folder),
                     identity=data_identity(listed))

# ==== NETWORKS: IMPALA CNN, VQ bottleneck, IDM, FDM (U-Net), decoder, agents ==================
class ResBlock(nn.Module):
    """x + conv3x3(mid -> c)(relu(conv3x3(c -> mid)(relu(x)))): IMPALA's block (mid = c), the U-Net's (mid = c/2)."""

    def __init__(self, c, mid=None):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(c, mid or c, 3, padding=1), nn.Conv2d(mid or c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))

class ImpalaCNN(nn.Module):
    """IMPALA CNN: 3 x [conv3x3, maxpool 3x3/2, 2 res blocks] (channels (16, 32, 32) x scale) -> flatten -> relu ->
    fc -> relu -> head. `features` is the 256-unit layer that PPO heads build on."""

    def __init__(self, in_ch, out_dim, scale=4.0, hidden=256, channels=(16, 32, 32)):
        super().__init__()
        layers, c, size = [], in_ch, 64
        for w in channels:
            w = max(1, int(round(w * scale)))
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.MaxPool2d(3, 2, padding=1), ResBlock(w), ResBlock(w)]
            c, size = w, (size + 1) // 2
        self.conv = nn.Sequential(*layers, nn.Flatten(), nn.ReLU())
        self.fc = nn.Linear(c * size * size, hidden)
        self.head = nn.Linear(hidden, out_dim)

    def features(self, x):
        return F.relu(self.fc(self.conv(x)))

    def forward(self, x):
        return self.head(self.features(x))

class VectorQuantizer(nn.Module):
    """VQ bottleneck with EMA codebooks. The 128-d latent is split into 8 vectors of 16 dims; codebook g
    (of 2, 64 codes each) quantizes vectors [4g, 4g+4). Codes move only by EMA (train mode), never by
    gradients; the encoder gets the straight-through gradient plus a commitment loss."""

    def __init__(self, latent_dim=128, code_dim=16, num_codebooks=2, codebook_size=64, decay=0.999, eps=1e-5):
        super().__init__()
        n_vec = latent_dim // code_dim
        assert latent_dim % code_dim == 0 and n_vec % num_codebooks == 0, "latent must split evenly"
        self.G, self.K, self.D, self.per = num_codebooks, codebook_size, code_dim, n_vec // num_codebooks
        self.decay, self.eps = decay, eps
        init = (torch.rand(self.G, self.K, self.D) * 2 - 1) * 5 / 64
        self.register_buffer("codebook", init)
        # EMA of code counts, from 0 as theirs: every code unused in step 1 is divided by a tiny count and leaves for
        # ~1/(1-decay) steps (an early collapse to a few codes, which a faster decay shortens in short runs)
        self.register_buffer("cluster_size", torch.zeros(self.G, self.K))
        self.register_buffer("embed_sum", init.clone())  # EMA of sums of the latents assigned

    def forward(self, z):
        """z (B, latent) -> (z_q straight-through, commitment loss, code indices (B, 8), perplexity)."""
        with torch.autocast(z.device.type, enabled=False):  # distances and losses in fp32
            z = z.float()
            b = z.shape[0]
            zg = z.view(b, self.G, self.per, self.D).transpose(0, 1).reshape(self.G, b * self.per, self.D)
            dist = (zg.pow(2).sum(-1, keepdim=True) - 2 * torch.bmm(zg, self.codebook.transpose(1, 2))
                    + self.codebook.pow(2).sum(-1).unsqueeze(1))
            idx = dist.argmin(-1)  # (G, B*per)
            q = torch.gather(self.codebook, 1, idx.unsqueeze(-1).expand(-1, -1, self.D))
            onehot = F.one_hot(idx, self.K).float()
            if self.training:
                self._ema_update(zg.detach(), onehot)
            commit = F.mse_loss(zg, q.detach())
            q = zg + (q - zg).detach()  # straight-through: forward uses the code, backward the identity
            usage = onehot.mean(1)
            perplexity = torch.exp(-(usage * torch.log(usage + 1e-10)).sum(-1)).mean()  # per codebook (authors: sum)
            zq = q.view(self.G, b, self.per, self.D).transpose(0, 1).reshape(b, -1)
            codes = idx.view(self.G, b, self.per).transpose(0, 1).reshape(b, -1)
        return zq, commit, codes, perplexity

    @torch.no_grad()
    def _ema_update(self, zg, onehot):
        counts, sums = onehot.sum(1), torch.bmm(onehot.transpose(1, 2), zg)
        if dist.is_initialized():  # under torchrun: the global batch's statistics, so every rank's codebooks stay equal
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum(-1, keepdim=True)  # Laplace smoothing, written back into the EMA counts:
        self.cluster_size.copy_((self.cluster_size + self.eps) / (n + self.K * self.eps) * n)
        self.codebook.copy_(self.embed_sum / self.cluster_size.unsqueeze(-1))

class IDM(nn.Module):
    """Latent inverse dynamics model: (o_{t-1}, o_t, o_{t+1}) -> continuous latent z_t -> VQ -> z_q."""

    def __init__(self, scale=4.0, latent_dim=128, vq=True, code_dim=16, num_codebooks=2, codebook_size=64,
                 vq_decay=0.999):
        super().__init__()
        self.encoder = ImpalaCNN(9, latent_dim, scale)
        self.vq = VectorQuantizer(latent_dim, code_dim, num_codebooks, codebook_size, vq_decay) if vq else None

    def forward(self, window):
        z = self.encoder(preprocess(window))
        if self.vq is None:  # the paper's no-VQ ablation: the FDM sees the continuous latent
            zero = z.new_zeros((), dtype=torch.float32)
            return {"z": z, "zq": z, "commit": zero, "perplexity": zero}
        zq, commit, codes, perplexity = self.vq(z)
        return {"z": z, "zq": zq, "commit": commit, "codes": codes, "perplexity": perplexity}

class UNetBlock(nn.Module):
    """Down: conv3x3 -> BatchNorm -> ResBlock(c, c/2) -> max-pool 2 -> ReLU; the output is also the skip.
    Up (input already concatenated with its skip): transposed conv 2x2/2 -> BatchNorm -> ResBlock(c, c/2) -> ReLU."""

    def __init__(self, cin, c, down=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, c, 3, padding=1) if down else nn.ConvTranspose2d(cin, c, 2, stride=2)
        self.norm, self.res, self.down = nn.BatchNorm2d(c), ResBlock(c, c // 2), down

    def forward(self, x, add=None):
        x = self.res(self.norm(self.conv(x) if add is None else self.conv(x) + add))
        return F.relu(F.max_pool2d(x, 2) if self.down else x)

class TiledLatentConv(nn.Module):
    """The latent's share of a conv3x3 over cat(frames, z tiled over the image), computed exactly without the tiled
    map: each kernel tap adds W_tap @ z wherever that tap reads inside the zero-padded image."""

    def __init__(self, weight, size=64):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())  # (cout, latent, 3, 3): a slice of the full conv
        inside = F.pad(torch.ones(size, size), (1, 1, 1, 1))
        self.register_buffer("masks", torch.stack([inside[i:i + size, j:j + size] for i in range(3)
                                                   for j in range(3)]))

    def forward(self, z):
        per_tap = torch.einsum("bc,ock->bok", z, self.weight.flatten(2).to(z.dtype))  # (B, cout, 9)
        return torch.einsum("bok,khw->bohw", per_tap, self.masks.to(z.dtype))

class FDM(nn.Module):
    """Forward dynamics U-Net: (o_{t-1}, o_t, z_q) -> o_{t+1}, the authors' network (7,814,139 params at width 24).
    Down blocks (6+128 -> w) on cat(frames, z tiled), (w -> 2w) ... (8w -> 16w): 64 -> 2 px; a 2x2 conv to 32w at 1x1.
    Up blocks concatenate their skip (deepest first: z itself at 1x1, then the down blocks' outputs) and double the
    size. Head: cat(x, frames) -> conv3x3 -> ResBlock -> ReLU -> conv1x1 -> tanh/2. z enters at input and bottleneck."""

    def __init__(self, latent_dim=128, width=24, residual=False):
        super().__init__()
        w = [width * 2 ** i for i in range(5)]
        first = nn.Conv2d(6 + latent_dim, w[0], 3, padding=1)  # one conv over 134 channels: one fan-in, as theirs
        self.down = nn.ModuleList([UNetBlock(6, w[0])] + [UNetBlock(a, b) for a, b in zip(w, w[1:])])
        with torch.no_grad():
            self.down[0].conv.weight.copy_(first.weight[:, :6])
            self.down[0].conv.bias.copy_(first.bias)
        self.z_in = TiledLatentConv(first.weight[:, 6:])
        self.mid = nn.Conv2d(w[4], 2 * w[4], 2)  # 2x2 -> 1x1, no activation
        ins, outs, skips = [2 * w[4]] + w[::-1], w[::-1] + [w[0]], [latent_dim] + w[::-1]
        self.up = nn.ModuleList([UNetBlock(i + s, o, down=False) for i, s, o in zip(ins, skips, outs)])
        self.head = nn.Sequential(nn.Conv2d(w[0] + 6, w[0], 3, padding=1), ResBlock(w[0], w[0] // 2), nn.ReLU(),
                                  nn.Conv2d(w[0], 3, 1))
        self.residual = residual
        if residual:  # (a small-scale deviation) start as an exact copy of o_t: all learning goes into the change
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    def forward(self, frames, zq):
        """frames uint8 (B, 2, H, W, C) = (o_{t-1}, o_t); zq (B, latent) -> prediction of o_{t+1} in [-0.5, 0.5]."""
        x = x_in = preprocess(frames)
        zq, skips = zq.to(x.dtype), []
        for i, block in enumerate(self.down):
            x = block(x, self.z_in(zq) if i == 0 else None)  # the first: conv(cat(frames, tiled z))
            skips.append(x)
        x = self.mid(x)
        for block, skip in zip(self.up, [zq[:, :, None, None]] + skips[::-1]):  # z, then the skips deepest first
            x = block(torch.cat([x, skip], 1))
        out = self.head(torch.cat([x, x_in.to(x.dtype)], 1))
        if self.residual:  # o_{t+1} = o_t + change (the change lies in [-1, 1])
            return x_in[:, 3:].to(out.dtype) + torch.tanh(out)
        return torch.tanh(out) / 2  # the paper's output, in the range of the scaled frames

class Decoder(nn.Module):
    """Latent action z (128) -> logits over the 15 real actions: the only part that ever sees actions. A plain MLP
    on the raw latents, as the authors'."""

    def __init__(self, latent_dim=128, hidden=(192, 128, 64)):
        super().__init__()
        sizes = (latent_dim, *hidden)
        layers = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], NUM_ACTIONS))

    def forward(self, z):
        return self.net(z.float())

def orthogonal(layer, gain):
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer

class Agent(nn.Module):
    """An actor-critic over uint8 frames (B,64,64,3) -> (logits, value or None), as heads(encode(obs)): encode is the
    part PPO never trains (identity by default), computed once per rollout frame and reused in every update epoch."""

    def encode(self, obs):
        return obs

    def forward(self, obs):
        return self.heads(self.encode(obs))

    @torch.no_grad()
    def act(self, obs, sample=True, amp=False):
        self.eval()
        with autocast(obs.device, amp):
            logits, value = self(obs)
        logits = logits.float()
        a = torch.distributions.Categorical(logits=logits).sample() if sample else logits.argmax(-1)
        v = torch.zeros(len(obs)) if value is None else value.float()
        return a.cpu().numpy(), v.cpu().numpy()

class ImpalaAgent(Agent):
    """Plain PPO / BC agent on the true actions: IMPALA CNN -> 256 -> (policy logits, value)."""
    kind = "impala"

    def __init__(self, scale=1.0):
        super().__init__()
        self.net = ImpalaCNN(3, NUM_ACTIONS, scale)
        self.value = orthogonal(nn.Linear(256, 1), math.sqrt(2))
        orthogonal(self.net.head, 0.01)  # near-uniform initial policy

    def heads(self, obs):
        h = self.net.features(preprocess(obs))
        return self.net.head(h), self.value(h).squeeze(-1)

class DecodedAgent(Agent):
    """Offline-decoded LAPO policy: a = decoder(pi(o_t)). No value head."""
    kind = "decoded"

    def __init__(self, scale=4.0, latent_dim=128):
        super().__init__()
        self.policy, self.decoder = ImpalaCNN(3, latent_dim, scale), Decoder(latent_dim)

    def heads(self, obs):
        return self.decoder(self.policy(preprocess(obs))), None

class OnlineAgent(Agent):
    """The paper's RL+SL policy for online decoding:
    logits = mean(RL head(trainable copy of the latent policy's 256-unit layer), decoder(frozen pi(o_t))).
    The RL head starts at zero, so PPO starts from the decoded latent policy and only learns corrections.
    The decoder is trained by supervised learning on IDM-labeled online transitions (not by PPO); with
    sl=False (the no-SL ablation) it is trained by PPO instead, like the RL head."""
    kind = "online"

    def __init__(self, scale=4.0, latent_dim=128, sl=True):
        super().__init__()
        self.policy = ImpalaCNN(3, latent_dim, scale)  # frozen latent policy from stage 2
        self.fc = copy.deepcopy(self.policy.fc)  # trainable copy of the 256-unit layer
        self.rl_head, self.value = nn.Linear(256, NUM_ACTIONS), orthogonal(nn.Linear(256, 1), math.sqrt(2))
        nn.init.zeros_(self.rl_head.weight)
        nn.init.zeros_(self.rl_head.bias)
        self.decoder, self.sl = Decoder(latent_dim), sl
        self.policy.requires_grad_(False)
        self.decoder.requires_grad_(not sl)

    def init_from(self, policy_state):
        self.policy.load_state_dict(policy_state)
        self.fc.load_state_dict(self.policy.fc.state_dict())

    @torch.no_grad()
    def encode(self, obs):  # the frozen conv trunk
        return self.policy.conv(preprocess(obs))

    def heads(self, trunk):
        with torch.no_grad():
            z = self.policy.head(F.relu(self.policy.fc(trunk)))  # the frozen latent policy's z = pi(o_t)
        h = F.relu(self.fc(trunk))
        return (self.rl_head(h) + self.decoder(z).to(h.dtype)) / 2, self.value(h).squeeze(-1)

AGENTS = {a.kind: a for a in (ImpalaAgent, DecodedAgent, OnlineAgent)}

def save_policy(path, agent, game, arch, **extra):
    """Policy checkpoint: everything `eval` and `collect --policy` need to rebuild and run the agent."""
    save_atomic({"kind": "policy", "agent": agent.kind, "arch": arch, "game": game,
                 "model": agent.state_dict(), **extra}, path)

def load_policy(path, device):
    ck = load_checkpoint(path, ("policy",))
    try:
        agent = AGENTS[ck["agent"]](**ck["arch"])
        agent.load_state_dict(ck["model"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise LapoError(f"{path}: policy checkpoint does not match this lapo.py ({type(e).__name__})")
    return agent.to(device).eval(), ck

# ==== STAGE 1: latent IDM + FDM, trained jointly to predict o_{t+1} through the VQ bottleneck ==
def make_lr_fn(total, warmup, start, end):
    """LR multiplier: linear warm-up start->1 over `warmup` steps, then linear 1->end at `total`."""
    def fn(step):
        if step < warmup:
            return start + (1 - start) * step / warmup
        return 1 + (end - 1) * min(1.0, (step - warmup) / max(1, total - warmup))
    return fn

def fmt_metrics(metrics):
    return " ".join(f"{k} {v:.4g}" for k, v in metrics.items())

def train_loop(stage, args, modules, opt, lr_fn, train_step, evaluate, total, ck=False):
    """Shared plumbing of stages 1 and 2: resume, LR schedule, progress lines, eval, atomic checkpoints.
    ck: the checkpoint to continue from, if run_stage already checked it (None: none)."""
    path, cfg, step, metrics, rank = os.path.join(args.out, f"{stage}.pt"), config_of(args), 0, {}, ddp_world()[0]
    gen = torch.Generator().manual_seed(args.seed + (rank << 32))  # batch sampling stream (each rank's), saved
    ck = resume_checkpoint(path, stage, args) if ck is False else ck
    prior = ck.get("wall_s", 0.0) if ck else 0.0  # seconds trained before this process
    if ck:
        for k, m in modules.items():
            m.load_state_dict(ck[k])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gens"][rank] if "gens" in ck else ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        step = ck["step"]
        print(f"{stage}: resumed from {path} at step {step}", flush=True)
    run_id = ck.get("run_id") if ck else uuid.uuid4().hex  # this run's identity, for the stages built on it
    first, t_start, t_eval, t_log, n_log = step, time.time(), 0.0, time.time(), 0
    while step < total:
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_fn(step)
        for m in modules.values():
            m.train()
        out = train_step(gen)
        step, n_log = step + 1, n_log + 1
        if (step % args.log_every == 0 or step == total) and rank == 0:  # rank 0 alone logs, evaluates and writes
            out = {k: float(v) for k, v in out.items()}  # the only host sync of the inner loop
            now, lr = time.time(), opt.param_groups[0]["lr"]
            sps = n_log * args.batch_size / (now - t_log)
            eta = (now - t_start - t_eval) / (step - first) * (total - step)
            log_metrics(args.out, stage, {"step": step, "lr": lr, "samples_per_s": sps, **out},
                        f"{stage} step {step}/{total} | {fmt_metrics(out)} | lr {lr:.2e} | {sps:.1f} samples/s | "
                        f"eta {fmt_time(eta)}")
            t_log, n_log = time.time(), 0
        if (step % args.eval_every == 0 or step == total) and rank == 0:  # the others wait at their next all-reduce
            t0 = time.time()
            metrics = evaluate()
            t_eval += time.time() - t0
            metrics["eval_frac"] = t_eval / max(1e-9, time.time() - t_start)
            log_metrics(args.out, stage, {"step": step, **metrics}, f"{stage} eval step {step}: {fmt_metrics(metrics)}")
            t_log += time.time() - t0
        gens = ddp_gather(gen.get_state()) if step % args.ckpt_every == 0 or step == total else None
        if gens and rank == 0:  # with every rank's sampling stream: --resume on as many ranks continues exactly
            save_atomic({"kind": stage, "config": cfg, "step": step, "opt": opt.state_dict(), "gens": gens,
                         "torch_rng": torch.get_rng_state(), "metrics": metrics, "run_id": run_id,
                         "wall_s": prior + time.time() - t_start, **{k: m.state_dict() for k, m in modules.items()}},
                        path)
    wall, trained = time.time() - t_start, step - first
    if trained == 0:  # resumed a finished run: report its last metrics
        metrics = ck["metrics"] or {}
    return {"stage": stage, "step": step, **metrics,
            "samples_per_s": trained * args.batch_size / max(1e-9, wall - t_eval) if trained else None,
            "wall_s": prior + wall}  # every process that trained it, up to the checkpoint each resumed from

def stage_setup(args, train_data, device, **modules):
    """Models to the device (channels_last), their AdamW, the train split to a GPU. -> (modules, params, opt, amp)"""
    modules = {k: m.to(device, memory_format=torch.channels_last) for k, m in modules.items()}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, fused=device.type == "cuda")
    train_data.to(device)
    return modules, params, opt, use_amp(args, device)

def run_stage(stage, build, args, train, test):
    """Check that --out may take this run (a resume must continue the same flags on the same inputs) before any frame
    is read; then load the splits, build the stage, train it with train_loop, write a summary. -> (modules, summary)"""
    given = {"train": train, "test": test}  # (tests pass FrameData; the commands read --data)
    ids = {s: d.identity if d else data_identity(chunk_paths(args.data, s, args.max_chunks if s == "train" else None))
           for s, d in given.items()}
    if ids["train"] or ids["test"]:  # in the config: --resume on other data is refused
        args.data_identity = f"train {ids['train']}; test {ids['test']}"
    args.game = train.game if train else data_game(args.data)
    ck = resume_checkpoint(os.path.join(args.out, f"{stage}.pt"), stage, args)  # its refusals, before any work
    rank, ranks = ddp_start(args, stage, ck)  # under torchrun: the ranks meet (each made the same checks)
    device, train_data = get_device(args), train or load_split(args.data, "train", args.max_chunks, rank, ranks)
    test_data = test or load_split(args.data, "test", 1 if rank else None)  # rank 0 alone evaluates: all of it
    modules, opt, lr_fn, train_step, evaluate = build(args, train_data, test_data, device)
    summary = train_loop(stage, args, modules, opt, lr_fn, train_step, evaluate, vars(args)[f"{stage}_steps"], ck)
    if rank == 0:
        write_summary(args.out, stage, summary)
    return [m.eval() for m in modules.values()], summary

def load_stage(out, stage):
    path = os.path.join(out, f"{stage}.pt")
    if not os.path.exists(path):
        raise LapoError(f"no stage-{stage[-1]} checkpoint {path}; run `python lapo.py {stage} --out {out} ...` first")
    ck = load_checkpoint(path, (stage,))
    total = (ck.get("config") or {}).get(f"{stage}_steps", ck.get("step"))
    if ck.get("step") != total:  # a killed run's last checkpoint: no later stage builds on it
        raise LapoError(f"{path} stopped at step {ck.get('step')} of {total}; finish it first (the same `python "
                        f"lapo.py {stage}` command with --resume)")
    return path, ck

def idm_latents(idm, data, centres, device, amp, batch=256):
    """Continuous (pre-quantization) IDM latents of the windows centred at `centres` -> float32 (n, 128) CPU."""
    idm.eval()
    return in_batches(lambda c: idm(data.windows(c, device))["z"].float(), centres, device, amp, batch)

def probe_accuracy(z, y, seed=0, steps=300):
    """Held-out probe (the stage-1 health signal): an MLP (2 x 128 hidden) from latent to true action,
    trained on the first half and tested on the second half. -> (accuracy, majority-class rate)."""
    n = len(z) // 2
    mean, std = z[:n].mean(0), z[:n].std(0) + 1e-6
    ztr, zte, ytr, yte = (z[:n] - mean) / std, (z[n:] - mean) / std, y[:n], y[n:]
    with seeded(seed), torch.enable_grad():
        mlp = nn.Sequential(nn.Linear(z.shape[1], 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                            nn.Linear(128, NUM_ACTIONS))
        opt = torch.optim.Adam(mlp.parameters(), lr=1e-3, weight_decay=1e-4)
        for _ in range(steps):
            idx = torch.randint(n, (min(n, 256),))
            optimize(opt, F.cross_entropy(mlp(ztr[idx]), ytr[idx]))
        with torch.no_grad():
            acc = (mlp(zte).argmax(-1) == yte).float().mean().item()
    majority = (yte == torch.bincount(ytr, minlength=NUM_ACTIONS).argmax()).float().mean().item()
    return acc, majority

def build_idm(cfg):
    """Stage 1's IDM from a config, a run's flags or a saved run's (every loader of a stage-1 checkpoint comes here)."""
    if cfg.get("idm_diff"):  # (its IDM read frame differences: the same weights would act on other inputs)
        raise LapoError("this stage-1 run was trained with --idm-diff, which lapo.py dropped after commit 8f3ab18; "
                        "train stage 1 again, or use that commit")
    return IDM(cfg["impala_scale"], cfg["latent_dim"], cfg["vq"], cfg["code_dim"], cfg["num_codebooks"],
               cfg["codebook_size"], cfg["vq_decay"])

def build_fdm(cfg):
    return FDM(cfg["latent_dim"], cfg["fdm_width"], residual=bool(cfg.get("fdm_residual", 0)))

def stage1_test_windows(args, test_data):
    """Stage 1's fixed held-out windows: the test loss's, then the probe's (None where the test split has no labels),
    drawn without replacement so that no window is in both halves of the probe."""
    g = torch.Generator().manual_seed(12345)
    eval_c, centres = test_data.sample(args.eval_windows, g), test_data.centres
    probe_c = centres[torch.randperm(len(centres), generator=g)[:args.probe_windows].to(centres.device)]
    return eval_c, probe_c if test_data.ta is not None and len(probe_c) >= 4 else None

def stage1_lr_fn(steps):
    """Stage 1's LR multiplier (the authors'): warm-up 0.1x -> 1x over 50 steps, then linear to 0.01x at the end."""
    return make_lr_fn(steps, 50, 0.1, 0.01)

def stage1_loss(idm, fdm, w, args, amp):
    """Stage 1's loss on a batch of windows w (B, 3, 64, 64, 3) uint8 -> (loss, metrics to log)."""
    # ALGO LOGIC: the FDM predicts o_{t+1} from the past frames and z_q, the only path for information about the
    # future; the VQ bottleneck keeps it small, so it learns "what changed", i.e. the action.
    with autocast(w.device, amp):
        out = idm(w)
        pred = fdm(w[:, :2], out["zq"])
    fdm_loss = F.mse_loss(pred.float(), preprocess(w[:, 2]))
    metrics = {"fdm_loss": fdm_loss, "commit": out["commit"], "perplexity": out["perplexity"]}
    return fdm_loss + args.commit_weight * out["commit"], {k: v.detach() for k, v in metrics.items()}

def build_stage1(args, train_data, test_data, device):
    """Stage 1's models, optimizer, LR schedule, train step and evaluation: what train_loop runs (and the bench
    times). -> (modules, opt, lr_fn, train_step, evaluate)"""
    args.game = train_data.game
    seed_everything(args.seed)
    modules, params, opt, amp = stage_setup(args, train_data, device, idm=build_idm(vars(args)),
                                            fdm=build_fdm(vars(args)))
    idm, fdm = modules["idm"], modules["fdm"]
    ddp_idm, ddp_fdm, batch = ddp_train(args, idm, fdm)  # the train step's (DDP under torchrun), its share of the batch
    n_params = lambda m: f"{sum(p.numel() for p in m.parameters()):,}"  # noqa: E731
    print(f"stage1: {len(train_data)} train frames ({len(train_data.centres)} windows), {len(test_data)} test frames "
          f"| IDM {n_params(idm)} FDM {n_params(fdm)} params | device {device} amp {amp}", flush=True)
    eval_c, probe_c = stage1_test_windows(args, test_data)

    def train_step(gen):
        w = train_data.windows(train_data.sample(batch, gen), device)
        loss, metrics = stage1_loss(ddp_idm, ddp_fdm, w, args, amp)
        return {**metrics, "grad_norm": optimize(opt, loss, params, args.max_grad_norm or math.inf)}

    @torch.no_grad()
    def evaluate():
        idm.eval(), fdm.eval()
        loss = 0.0
        for i in range(0, len(eval_c), 256):
            w = test_data.windows(eval_c[i:i + 256], device)
            with autocast(device, amp):
                pred = fdm(w[:, :2], idm(w)["zq"])
            loss += F.mse_loss(pred.float(), preprocess(w[:, 2]), reduction="sum").item() / pred[0].numel()
        m = {"test_fdm_loss": loss / len(eval_c)}
        if probe_c is not None:
            z = idm_latents(idm, test_data, probe_c, device, amp)
            m["probe_acc"], m["probe_majority"] = probe_accuracy(z, test_data.labels(probe_c), args.seed)
        return m

    return modules, opt, stage1_lr_fn(args.stage1_steps), train_step, evaluate

def stage1(args, train=None, test=None):
    """Train the latent IDM and the FDM jointly on action-free video. -> (idm, fdm, summary)."""
    (idm, fdm), summary = run_stage("stage1", build_stage1, args, train, test)
    return idm, fdm, summary

def load_stage1(out, device, data_game=None):
    path, ck = load_stage(out, "stage1")
    if data_game and ck["config"].get("game") and ck["config"]["game"] != data_game:
        raise LapoError(f"{path} was trained on {ck['config']['game']}, but the data is {data_game}")
    if ck["config"].get("supervised"):  # tools/diagnose.py supervised-idm
        raise LapoError(f"{path} is the supervised-IDM diagnostic (trained on true actions), not a latent IDM")
    idm = build_idm(ck["config"])
    idm.load_state_dict(ck["idm"])
    return idm.to(device, memory_format=torch.channels_last).eval().requires_grad_(False), ck

# ==== STAGE 2: latent behaviour cloning pi(o_t) -> z_t on IDM-labeled frames ===================
def build_stage2(args, train_data, test_data, device):
    """Stage 2's latent policy, optimizer, LR schedule, train step and evaluation, on the frozen IDM of stage 1."""
    idm, ck1 = load_stage1(args.out, device, train_data.game)
    stage2_inputs(args, ck1)
    seed_everything(args.seed)
    modules, params, opt, amp = stage_setup(args, train_data, device,
                                            policy=ImpalaCNN(3, ck1["config"]["latent_dim"], args.impala_scale))
    policy, (ddp_policy, batch) = modules["policy"], ddp_train(args, modules["policy"])
    eval_c = test_data.sample(args.eval_windows, torch.Generator().manual_seed(12345))
    eval_z = idm_latents(idm, test_data, eval_c, device, amp) if ddp_world()[0] == 0 else None  # rank 0 evaluates

    def train_step(gen):
        # ALGO LOGIC: regress the frozen IDM's *continuous, pre-quantization* latent of the window centred on o_t
        # from o_t alone: it is richer than the code index, and its MSE is smooth.
        w = train_data.windows(train_data.sample(batch, gen), device)
        with torch.no_grad(), autocast(device, amp):
            target = idm(w)["z"].float()
        with autocast(device, amp):
            pred = ddp_policy(preprocess(w[:, 1]))
        loss = F.mse_loss(pred.float(), target)
        return {"loss": loss.detach(), "grad_norm": optimize(opt, loss, params, args.max_grad_norm or math.inf)}

    def evaluate():
        policy.eval()
        pred = in_batches(lambda c: policy(preprocess(test_data.windows(c, device)[:, 1])).float(), eval_c, device, amp)
        return {"test_loss": F.mse_loss(pred, eval_z).item(),
                "test_loss_mean_baseline": F.mse_loss(eval_z.mean(0).expand_as(eval_z), eval_z).item()}

    return modules, opt, make_lr_fn(args.stage2_steps, args.warmup2, 0.01, 0.0), train_step, evaluate

def stage2_inputs(args, ck1):
    """Stage 2's record of the stage-1 run it is built on (in its config: a resume on another one is refused)."""
    args.stage1_config = {k: ck1["config"][k] for k in ("latent_dim", "vq", "impala_scale")}
    args.stage1_run = ck1.get("run_id")

def stage2(args, train=None, test=None):
    """Behaviour-clone the latent policy on the frozen IDM's latents. -> (policy, summary)."""
    _, ck1 = load_stage1(args.out, torch.device("cpu"), train.game if train else data_game(args.data))
    stage2_inputs(args, ck1)  # before run_stage's checks
    (policy,), summary = run_stage("stage2", build_stage2, args, train, test)
    return policy, summary

def load_stage2(out, device, ck1=None):
    """The latent policy of <out>/stage2.pt; with ck1, refused unless it was trained on that stage-1 run."""
    path, ck = load_stage(out, "stage2")
    if ck1 is not None and ck["config"].get("stage1_run") != ck1.get("run_id"):
        raise LapoError(f"{path} was trained on another stage-1 run than {out}/stage1.pt; run stage 2 again")
    policy = ImpalaCNN(3, ck["config"]["stage1_config"]["latent_dim"], ck["config"]["impala_scale"])
    policy.load_state_dict(ck["policy"])
    return policy.to(device).eval().requires_grad_(False), ck

# ==== STAGE 3 (offline): decode latent actions with a small action-labeled set =================
def logits_of(out):
    return out[0] if isinstance(out, tuple) else out  # agents return (logits, value)

def train_classifier(model, inputs, labels, steps, batch, lr, seed, smoothing=0.05, device="cpu"):
    """Cross-entropy training on an in-memory labeled set (decoder on latents, or BC on uint8 frames), in shuffled
    epochs: `steps` = epochs x ceil(n / batch) runs whole epochs."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    perm, pos = None, len(labels)
    for _ in range(steps):
        if pos >= len(labels):
            perm, pos = torch.randperm(len(labels), generator=gen), 0
        idx, pos = perm[pos:pos + batch], pos + batch
        logits = logits_of(model(inputs[idx].to(device)))
        optimize(opt, F.cross_entropy(logits.float(), labels[idx].to(device), label_smoothing=smoothing))
    return model.eval()

def fit_decoder(decoder, z, labels, steps, seed):
    """The decoder's supervised fit, offline and online alike (the authors': Adam 1e-3, batch 512, smoothing 0.05)."""
    return train_classifier(decoder, z, labels, steps, 512, 1e-3, seed)

def accuracy(model, inputs, labels, device, batch=512):
    pred = in_batches(lambda x: logits_of(model(x.to(device))).argmax(-1), inputs, device, False, batch)
    return (pred == labels).sum().item() / len(labels)

def policy_latents(policy, frames, device, amp, batch=256):
    return in_batches(lambda f: policy(preprocess(f.to(device))).float(), frames, device, amp, batch)

def save_and_evaluate(args, name, agent, game, arch, summary_name=None, head=None, **extra):
    """Save the policy as <out>/<name>.pt and evaluate it in the env -> eval metrics. With summary_name, write
    head + path + eval metrics as <out>/<summary_name>_summary.json and return that summary instead."""
    path = os.path.join(args.out, f"{name}.pt")
    save_policy(path, agent, game, arch, **extra)
    metrics = evaluate_agent(agent, game, args, path)
    if summary_name is None:
        return metrics
    summary = {**head, "path": path, **metrics}
    write_summary(args.out, summary_name, summary)
    return summary

def heldout_centres(test):
    """Stage 3's fixed held-out windows (2,048 test-split frames) for accuracy; results/scripts measures on them too."""
    return test.sample(min(2048, len(test.centres)), torch.Generator().manual_seed(1))

def labeled_centres(data, n, seed):
    """The n windows whose true actions offline decoding reads (nested: a larger n adds windows to a smaller n's)."""
    return data.centres[torch.randperm(len(data.centres), generator=torch.Generator().manual_seed(seed))[:n].to(
        data.centres.device)]

def stage3_game(ck1, args):
    """The game stage 3's policies are evaluated on: stage 1's data folder's name, or --env."""
    game = ck1["config"].get("game")
    if game and args.env and args.env != game:
        raise LapoError(f"--env {args.env} contradicts stage 1's data ({game}): drop --env, or train stage 1 on it")
    game = game or args.env
    if game is None:
        raise LapoError("the stage-1 data folder is not named after a Procgen game; pass --env GAME")
    check_game(game)
    return game

def stage3_offline(args):
    """Train only the decoder on N labeled frames per --labels value; evaluate in the env. -> summary."""
    methods = ("decoded", "bc")[:1 + (args.baseline == "bc")]
    args.on_interrupt = (f"offline decoding does not resume: move this sweep's decoded_*.pt and bc_*.pt out of "
                         f"{args.out}, then run the same command again")
    for f in ["stage3_offline_summary.json"] + [f"{m}_{n}.pt" for n in args.labels for m in methods]:
        if os.path.exists(os.path.join(args.out, f)):
            raise LapoError(f"{os.path.join(args.out, f)} exists: offline results are never overwritten; move the "
                            "earlier ones away, or copy stage1.pt and stage2.pt into another --out")
    device = get_device(args)
    amp = use_amp(args, device)
    _, ck1 = load_stage1(args.out, device, data_game(args.data))  # (checks that stage 1 learnt from this game)
    policy, ck2 = load_stage2(args.out, device, ck1)
    game = stage3_game(ck1, args)  # before anything is read or written
    train_data, test_data = load_split(args.data, "train", args.max_chunks), load_split(args.data, "test")
    for d in (train_data, test_data):
        if d.ta is None:
            raise LapoError(f"{d.name} has no action labels 'ta'; offline decoding needs a labeled set")
    if max(args.labels) > len(train_data.centres):
        raise LapoError(f"--labels {max(args.labels)} asks for more labeled frames than the "
                        f"{len(train_data.centres)} in {train_data.name}")
    test_c = heldout_centres(test_data)
    test_frames, test_y = test_data.obs[test_c.cpu()], test_data.labels(test_c)
    test_pi = policy_latents(policy, test_frames, device, amp)
    arch = {"scale": ck2["config"]["impala_scale"], "latent_dim": ck1["config"]["latent_dim"]}
    results = []
    for n in args.labels:
        c = labeled_centres(train_data, n, args.seed)
        y = train_data.labels(c)
        # ALGO LOGIC: the decoder maps latent actions to real ones. Fit it on pi(o_t), what it decodes when acting;
        # the IDM's latents are cleaner, but pi(o_t) is their mean given o_t alone: a shifted input.
        z = policy_latents(policy, train_data.obs[c.cpu()], device, amp)
        torch.manual_seed(args.seed + n)  # the decoder's initial weights: same seed, same result
        agent = DecodedAgent(**arch)
        agent.policy.load_state_dict(policy.state_dict())
        fit_decoder(agent.decoder, z, y, args.decoder_steps, args.seed + n)
        agent = agent.to(device).eval()
        row = {"method": "lapo", "labels": n, "test_acc": accuracy(agent.decoder, test_pi, test_y, device)}
        results.append({**row, **save_and_evaluate(args, f"decoded_{n}", agent, game, arch, labels=n)})
        if args.baseline == "bc":  # BC from scratch: same network, same N frames, true actions
            torch.manual_seed(args.seed + n)
            bc = ImpalaAgent(arch["scale"]).to(device)
            train_classifier(bc, train_data.obs[c.cpu()], y, args.bc_steps, 64, 5e-4, args.seed + n, device=device)
            row = {"method": "bc", "labels": n, "test_acc": accuracy(bc, test_frames, test_y, device)}
            results.append({**row, **save_and_evaluate(args, f"bc_{n}", bc, game, {"scale": arch["scale"]}, labels=n)})
    summary = {"stage": "stage3_offline", "game": game, "results": results}
    write_summary(args.out, "stage3_offline", summary)
    return summary

# ==== PPO: one implementation for the expert, PPO from scratch, and online decoding (stage 3 online) ====
class RewardNormalizer:
    """Divides rewards by the running std of the discounted return, then clips (common PPO-Procgen setup)."""

    def __init__(self, num_envs, gamma, clip=10.0):
        self.ret, self.gamma, self.clip = np.zeros(num_envs), gamma, clip
        self.count, self.mean, self.var = 1e-4, 0.0, 1.0

    def __call__(self, rew, done):
        self.ret = self.ret * self.gamma + rew
        b_mean, b_var, b_n = self.ret.mean(), self.ret.var(), len(self.ret)
        delta, tot = b_mean - self.mean, self.count + b_n  # parallel (Chan et al.) mean/variance update
        self.var = (self.var * self.count + b_var * b_n + delta ** 2 * self.count * b_n / tot) / tot
        self.mean, self.count = self.mean + delta * b_n / tot, tot
        self.ret[done] = 0.0
        return np.clip(rew / np.sqrt(self.var + 1e-8), -self.clip, self.clip).astype(np.float32)

    def state_dict(self):  # a tensor and floats: checkpoints hold no numpy objects (they load with weights_only)
        return {"ret": torch.from_numpy(self.ret.copy()), "count": float(self.count), "mean": float(self.mean),
                "var": float(self.var)}

    def load_state_dict(self, s):
        self.ret, self.count, self.mean, self.var = s["ret"].numpy().copy(), s["count"], s["mean"], s["var"]

def gae(rewards, values, dones, next_value, gamma, lam):
    """Generalized advantage estimation over (T, E) tensors. dones[t]: the episode ended with step t,
    so nothing is bootstrapped from the state after it."""
    adv, last = torch.zeros_like(rewards), torch.zeros_like(next_value)
    for t in reversed(range(len(rewards))):
        nv = next_value if t == len(rewards) - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t].float()
        delta = rewards[t] + gamma * nv * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        adv[t] = last
    return adv, adv + values

def ppo_loss(logits, value, act, old_logp, adv, ret, old_value, clip, ent_coef, vf_coef):
    """PPO's loss on one minibatch: clipped surrogate on normalized advantages, clipped value loss, entropy bonus.
    -> (loss, policy loss, value loss, entropy)"""
    dist = torch.distributions.Categorical(logits=logits.float())
    ratio = torch.exp(dist.log_prob(act) - old_logp)
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
    value = value.float()
    v_clip = old_value + (value - old_value).clamp(-clip, clip)
    v_loss = 0.5 * torch.max((value - ret) ** 2, (v_clip - ret) ** 2).mean()
    entropy = dist.entropy().mean()
    return pg_loss - ent_coef * entropy + vf_coef * v_loss, pg_loss, v_loss, entropy

def ppo(args, agent, groups, stage, game, on_update=None, extra_state=None):
    """Train `agent` with PPO. groups: list of (name, params, lr_fn(frames)); on_update(ctx) runs after each
    update (online decoding retrains its decoder there). Returns the learning curve (list of dicts)."""
    device = get_device(args)
    amp, E, T = use_amp(args, device), args.num_envs, args.num_steps
    n_updates = max(1, args.frames // (E * T))
    agent.to(device)  # before the optimizer: a resumed Adam state is moved to its parameters' device
    opt = torch.optim.Adam([{"params": p, "lr": 0.0, "name": n} for n, p, _ in groups], eps=1e-8)
    params = [p for _, ps, _ in groups for p in ps]
    path, start, curve, prior = os.path.join(args.out, f"{stage}_state.pt"), 0, [], 0.0
    ck = resume_checkpoint(path, "ppo", args)  # its refusals, before the environments start
    norm = RewardNormalizer(E, args.gamma)
    if ck:
        prior = ck.get("wall_s", 0.0)  # seconds trained before this process
        agent.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        norm.load_state_dict(ck["norm"])
        start, curve = ck["update"], ck["curve"]
        if extra_state is not None:
            extra_state["load"](ck["extra"])
        # fresh environments on new levels, and new action samples: a resume never replays the run's start
        norm.ret[:] = 0.0  # (the running returns belonged to the old episodes; the statistics stay)
        torch.manual_seed(args.seed + start)
        print(f"{stage}: resumed at update {start} (environments restart fresh on new levels)", flush=True)
    envs = Envs(game, E, args.seed + 30_000 + start)  # levels of its own: collect's are seed and seed + 10,000
    obs_buf = torch.zeros((T + 1, E, 64, 64, 3), dtype=torch.uint8, device=device)
    act_buf, logp_buf, val_buf, rew_buf, done_buf = (torch.zeros((T, E), device=device) for _ in range(5))
    obs = torch.from_numpy(envs.reset()).to(device)
    prev = {"obs": obs.clone(), "done": torch.ones(E, dtype=torch.bool, device=device)}  # frame before the rollout
    t0 = time.time()
    for update in range(start, n_updates):
        for g, (_, _, lr_fn) in zip(opt.param_groups, groups):
            g["lr"] = lr_fn(update * E * T)
        t_roll, finished, enc_buf = time.time(), [], []
        agent.eval()
        for t in range(T):  # ---- rollout
            obs_buf[t] = obs
            with torch.no_grad(), autocast(device, amp):
                enc = agent.encode(obs_buf[t])
                logits, value = agent.heads(enc)
            enc_buf.append(enc)
            dist = torch.distributions.Categorical(logits=logits.float())
            a = dist.sample()
            act_buf[t], logp_buf[t], val_buf[t] = a, dist.log_prob(a), value.float()
            nxt, rew, done, fin = envs.step(a.cpu().numpy())
            finished += fin
            rew_buf[t] = torch.from_numpy(norm(rew, done)).to(device)
            done_buf[t] = torch.from_numpy(done).to(device)
            obs = torch.from_numpy(nxt).to(device)
        obs_buf[T] = obs
        with torch.no_grad(), autocast(device, amp):
            next_value = agent(obs)[1].float()
        adv, ret = gae(rew_buf, val_buf, done_buf, next_value, args.gamma, args.gae_lambda)
        t_roll = time.time() - t_roll
        # ---- PPO update: clipped surrogate, clipped value loss, entropy bonus
        agent.train()
        b_enc, b_act, b_logp = torch.cat(enc_buf), act_buf.reshape(-1).long(), logp_buf.reshape(-1)
        b_adv, b_ret, b_val = adv.reshape(-1), ret.reshape(-1), val_buf.reshape(-1)
        clip, stats = args.clip_coef, []
        for _ in range(args.update_epochs):  # exactly --num-minibatches minibatches, of >= 2 samples each (checked)
            for idx in torch.randperm(T * E, device=device).tensor_split(args.num_minibatches):
                with autocast(device, amp):
                    logits, value = agent.heads(b_enc[idx])
                loss, pg_loss, v_loss, entropy = ppo_loss(logits, value, b_act[idx], b_logp[idx], b_adv[idx],
                                                          b_ret[idx], b_val[idx], clip, args.ent_coef, args.vf_coef)
                optimize(opt, loss, params, args.max_grad_norm)
                stats.append(torch.stack([pg_loss.detach(), v_loss.detach(), entropy.detach()]))
        frames, info = (update + 1) * E * T, {}
        if on_update is not None:
            info = on_update({"update": update, "frames": frames, "obs": obs_buf, "actions": act_buf.long(),
                              "dones": done_buf.bool(), "prev": prev}) or {}
        prev = {"obs": obs_buf[T - 1].clone(), "done": done_buf[T - 1].bool()}  # o_{T-1}: the next rollout's o_{-1}
        pg, vl, ent = torch.stack(stats).mean(0).tolist()
        rets = [r for _, r in finished]
        mean_ret = float(np.mean(rets)) if finished else None
        el = time.time() - t0
        point = {"update": update + 1, "frames": frames, "mean_return": mean_ret, "episodes": len(finished),
                 "normalized_return": normalized_return(game, mean_ret, args.expert_return) if finished else None,
                 "episode_returns": rets, "pg_loss": pg, "v_loss": vl, "entropy": ent, **info,
                 "fps": (frames - start * E * T) / el, "wall_s": prior + el}  # env frames/s including updates
        curve.append({k: v for k, v in point.items() if k != "episode_returns"})
        dec = f" | decoder acc {info['decoder_train_acc']:.3f} on {info['decoder_pairs']} pairs" if info else ""
        log_metrics(args.out, stage, point, f"{stage} update {update + 1}/{n_updates} frames {frames} | return "
                    f"{'n/a' if mean_ret is None else f'{mean_ret:.2f}'} ({len(finished)} eps) | pg {pg:.3f} "
                    f"v {vl:.3f} ent {ent:.3f}{dec} | {point['fps']:.1f} frames/s (rollout {t_roll:.1f}s) | "
                    f"eta {fmt_time(el / (update + 1 - start) * (n_updates - update - 1))}")
        if (update + 1) % args.ckpt_every_updates == 0 or update + 1 == n_updates:
            save_atomic({"kind": "ppo", "config": config_of(args), "update": update + 1, "model": agent.state_dict(),
                         "opt": opt.state_dict(), "norm": norm.state_dict(), "curve": curve, "wall_s": prior + el,
                         "extra": extra_state["save"]() if extra_state else None}, path)
    envs.close()
    return curve

def ramp(start, end, peak, total):
    """LR that is 0 until `start` frames, rises linearly to `peak` at `end`, then falls linearly to 0 at `total`."""
    def fn(frames):
        if frames <= start:
            return 0.0
        if frames < end:
            return peak * (frames - start) / (end - start)
        return peak * max(0.0, (total - frames) / max(1, total - end))
    return fn

def expert(args):
    """Train a policy from scratch on the true actions (data-collection expert, or the PPO-from-scratch baseline)."""
    check_game(args.env)
    seed_everything(args.seed)
    agent = ImpalaAgent(args.impala_scale)
    anneal = lambda f: args.lr * max(0.0, 1 - f / args.frames)  # noqa: E731
    curve = ppo(args, agent, [("all", list(agent.parameters()), anneal)], "expert", args.env)
    head = {"stage": "expert", "game": args.env, "frames": curve[-1]["frames"], "wall_s": curve[-1]["wall_s"]}
    return agent, save_and_evaluate(args, "expert", agent, args.env, {"scale": args.impala_scale}, "expert", head,
                                    curve=curve)

def decoder_due(finished, frames, s=1.0):
    """The paper's decoder schedule, after `finished` PPO updates (`frames` env frames): refit after every update
    while 10k < frames < 50k, then after every 20th update until 400k frames (thresholds times s)."""
    return 10_000 * s < frames < 400_000 * s and (frames < 50_000 * s or finished % 20 == 0)

def window_pairs(obs, actions, dones, prev):
    """IDM windows of one rollout: obs (T+1, E, ...) plus the frame before it. -> (frames (n,3,...), actions)
    for every t whose (o_{t-1}, o_t, o_{t+1}) lies inside one episode."""
    T = actions.shape[0]
    ext = torch.cat([prev["obs"][None], obs], 0)  # ext[t+1] = o_t, ext[0] = o_{-1}
    ext_done = torch.cat([prev["done"][None], dones], 0)  # ext_done[t+1] = done after step t
    ok = ~ext_done[:T] & ~ext_done[1:T + 1]  # no episode end between o_{t-1}, o_t and o_{t+1}
    t_idx, e_idx = torch.nonzero(ok, as_tuple=True)
    win = torch.stack([ext[t_idx, e_idx], ext[t_idx + 1, e_idx], ext[t_idx + 2, e_idx]], 1)
    return win, actions[t_idx, e_idx]

def stage3_online(args):
    """Online decoding: PPO on the real environment with the RL+SL policy. -> (agent, curve)."""
    device = get_device(args)
    idm, ck1 = load_stage1(args.out, device)
    policy, ck2 = load_stage2(args.out, device, ck1)
    game = stage3_game(ck1, args)
    args.stage1_run, args.stage2_run = ck1.get("run_id"), ck2.get("run_id")  # a resume on other stages is refused
    amp = use_amp(args, device)
    seed_everything(args.seed)
    arch = {"scale": ck2["config"]["impala_scale"], "latent_dim": ck1["config"]["latent_dim"], "sl": not args.no_sl}
    agent = OnlineAgent(**arch)
    agent.init_from(policy.state_dict())
    s, lr = args.schedule_scale, args.lr
    rl_params = list(agent.rl_head.parameters()) + ([] if agent.sl else list(agent.decoder.parameters()))
    groups = [("rl_head", rl_params, ramp(35_000 * s, 50_000 * s, lr / 4, args.frames)),
              ("value", list(agent.value.parameters()), ramp(25_000 * s, 50_000 * s, lr / 4, args.frames)),
              ("fc_copy", list(agent.fc.parameters()), ramp(50_000 * s, 200_000 * s, lr / 10, args.frames))]
    store = {"z": [], "a": []}  # (IDM latent, action taken) pairs of all online transitions so far

    def on_update(ctx):
        # ALGO LOGIC (SL): label online transitions with the frozen IDM, retrain the decoder from scratch (until 400k
        # frames). Without SL, PPO trains the decoder (from the RL head's ramp on).
        if not agent.sl or ctx["frames"] > 400_000 * s:
            return {}
        win, act = window_pairs(ctx["obs"], ctx["actions"], ctx["dones"], ctx["prev"])
        if len(act):
            store["z"].append(in_batches(lambda w: idm(w.to(device))["z"].float(), win, device, amp))
            store["a"].append(act.cpu())
        if not decoder_due(ctx["update"] + 1, ctx["frames"], s) or not store["a"]:
            return {}
        z, a, seed = torch.cat(store["z"]), torch.cat(store["a"]), args.seed + ctx["update"]
        with seeded(seed):
            dec = Decoder(arch["latent_dim"])
        fit_decoder(dec, z, a, 3 * math.ceil(len(a) / 512), seed)  # 3 epochs of batch 512, as the authors'
        agent.decoder.load_state_dict(dec.state_dict())
        return {"decoder_pairs": len(a), "decoder_train_acc": accuracy(dec, z[-4096:], a[-4096:], "cpu")}

    extra = {"save": lambda: {"z": store["z"], "a": store["a"]}, "load": lambda e: store.update(e or {})}
    name = "online" if agent.sl else "online_nosl"
    curve = ppo(args, agent, groups, name, game, on_update, extra)
    head = {"stage": "stage3_online", "game": game, "frames": curve[-1]["frames"], "sl": agent.sl,
            "wall_s": curve[-1]["wall_s"]}
    save_and_evaluate(args, name, agent, game, arch, f"stage3_{name}", head, curve=curve)
    return agent, curve

# ==== EVALUATION ================================================================================
def normalized_return(game, mean_return, expert_return=None):
    lo, hi = SCORES[game]
    hi = hi if expert_return is None else expert_return
    return None if hi == lo else (mean_return - lo) / (hi - lo)  # (None: an --expert-return equal to random's)

@torch.no_grad()
def evaluate_policy(agent, game, episodes, seed, device, amp=False, sample=True, max_steps=None, num_envs=64):
    """Run `episodes` full episodes (the first ones of each env, so short episodes are not over-counted).
    -> list of raw episode returns (episodes cut at max_steps count with their return so far)."""
    n = min(episodes, num_envs)
    quota = math.ceil(episodes / n)
    envs, agent = Envs(game, n, seed), agent.to(device).eval()
    obs, got, steps = envs.reset(), [[] for _ in range(n)], 0
    while any(len(g) < quota for g in got):
        a, _ = agent.act(torch.from_numpy(obs).to(device), sample=sample, amp=amp)
        obs, _, _, fin = envs.step(a)
        for e, r in fin:
            if len(got[e]) < quota:
                got[e].append(r)
        steps += 1
        if max_steps and steps >= max_steps:  # cut: count unfinished episodes at their current return
            for e in range(n):
                if len(got[e]) < quota:
                    got[e].append(float(envs.ret[e]))
            break
    envs.close()
    return [r for g in got for r in g][:episodes]

def evaluate_agent(agent, game, args, path=None):
    device, t0 = get_device(args), time.time()
    with seeded(args.seed + 20_000):  # evaluation samples its actions from its own stream
        rets = evaluate_policy(agent, game, args.eval_episodes, args.seed + 20_000, device, use_amp(args, device),
                               sample=not args.greedy, max_steps=args.eval_max_steps)
    mean = float(np.mean(rets))
    out = {"eval_mean_return": mean, "eval_std_return": float(np.std(rets)), "eval_episodes": len(rets),
           "eval_normalized_return": normalized_return(game, mean, args.expert_return), "eval_returns": rets,
           "eval_s": time.time() - t0}
    norm = "" if out["eval_normalized_return"] is None else f" | normalized {out['eval_normalized_return']:.3f}"
    print(f"eval {path or ''} on {game}: return {mean:.2f} +- {out['eval_std_return']:.2f} over {len(rets)} episodes"
          f"{norm}", flush=True)
    return out

def eval_cmd(args):
    agent, ck = load_policy(args.checkpoint, get_device(args))
    game = args.env or ck.get("game")
    check_game(game)
    summary = {"checkpoint": args.checkpoint, "game": game, **evaluate_agent(agent, game, args, args.checkpoint)}
    print(json.dumps(summary), flush=True)
    return summary

# ==== SEVERAL RANKS: stages 1 and 2 under torchrun (DDP) ===================================
# Rank r of N loads the train chunks r, r + N, ... and draws batch/N windows; DDP averages the gradients, the VQ sums
# its EMA statistics over the ranks (DDP leaves buffers alone after its start: forward_sync_buffers=False); BatchNorm
# covers the global batch on GPUs (SyncBatchNorm), each rank's batch/N on CPUs. Rank 0 alone locks, evaluates, writes.
def ddp_world():
    """(this process's rank, ranks): torchrun's RANK and WORLD_SIZE; (0, 1) without torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

def ddp_rank(args):
    """This process's rank (rank 0 alone locks the run folder); refuses the commands that run in one process only."""
    rank, ranks = ddp_world()
    if ranks > 1 and getattr(args, "cmd", None) not in ("stage1", "stage2"):
        raise LapoError("torchrun runs stage1 and stage2; every other command runs in one process (README)")
    return rank

def ddp_start(args, stage, ck):
    """After the run's checks (the same on every rank): refuse what the ranks cannot share, then join them, NCCL with
    one GPU per rank or gloo on CPUs; only rank 0 prints. -> (rank, ranks)"""
    rank, ranks = ddp_world()
    chunks = len(chunk_paths(args.data, "train", args.max_chunks)) if ranks > 1 else 0
    if ck and len(ck.get("gens", [0])) != ranks:  # each rank's sampling stream continues on its own rank only
        raise LapoError(f"{args.out}/{stage}.pt was trained on {len(ck.get('gens', [0]))} ranks; resume it on as many")
    if args.batch_size % ranks or chunks % ranks:  # equal shares of equal chunks: sampling uniform over all windows
        raise LapoError(f"{ranks} ranks need --batch-size and the train chunks in multiples of {ranks}, got "
                        f"--batch-size {args.batch_size} and {chunks} chunks (--max-chunks takes fewer)")
    if ranks > 1:
        cuda, local = get_device(args).type == "cuda", int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local)
        # Rank 0 evaluates while the others wait at their next all-reduce (stage 1 at `paper`: 35 s on 2 CPU cores,
        # the authors' probe 538 s): far below this timeout (NCCL's default is 10 minutes).
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1))
        sys.stdout = open(os.devnull, "w") if rank else sys.stdout
        print(f"{stage}: {ranks} ranks, each with {chunks // ranks} of the {chunks} train chunks (rank r: chunks r, "
              f"r + {ranks}, ...) and batch {args.batch_size // ranks} of {args.batch_size}", flush=True)
    return rank, ranks

def ddp_train(args, *modules):
    """The modules a train step calls, and its batch: under torchrun each in DDP, and this rank's share."""
    if not dist.is_initialized():
        return (*modules, args.batch_size)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm if next(modules[0].parameters()).is_cuda else lambda m: m
    return (*[nn.parallel.DistributedDataParallel(sync(m), forward_sync_buffers=False) for m in modules],
            args.batch_size // dist.get_world_size())

def ddp_gather(obj):
    """[every rank's obj] under torchrun; [obj] in one process."""
    objs = [obj] * ddp_world()[1]
    if dist.is_initialized():
        dist.all_gather_object(objs, obj)
    return objs

# ==== THE RUN FOLDER AND THE COMMAND LINE: plumbing the method calls (a first read can stop here) ======
LOCK = "lapo.lock"

def check_out(out):
    """Fail fast, before any data is loaded or model built, when the run folder cannot be written."""
    try:
        os.makedirs(out, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise LapoError(f"--out {out} is not writable ({e.strerror}); choose a folder you can write to")

def flock(path, exclusive):
    """flock `path` without waiting -> the open file; where another process holds it, one line that names its pid."""
    f = open(path, "a+" if exclusive else "r")
    try:
        fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        with f:
            f.seek(0)
            raise LapoError(f"{os.path.dirname(path)} is in use by process {f.read().strip() or '?'} (its {LOCK}); "
                            "wait for it to end, or use another --out") from None
    return f

@contextlib.contextmanager
def run_lock(out):
    """One writer per run folder: an exclusive flock on <out>/lapo.lock (holding the owner's pid) while a command runs;
    the kernel drops it with the process, and the file stays. Folders inside a locked one count too (videos import)."""
    check_out(out)
    folder = os.path.abspath(out)
    while folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
        with contextlib.suppress(OSError):  # (no lock file there: not a run folder)
            flock(os.path.join(folder, LOCK), exclusive=False).close()
    with flock(os.path.join(out, LOCK), exclusive=True) as f:
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield

def write_atomic(path, write):
    """write(file) into <path>.tmp, then os.replace it: a crash, full disk or Ctrl-C before that leaves the old file."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush(), os.fsync(f.fileno())  # on disk before the rename: a power loss leaves the old file or the new
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # (torch.save reports a failed write as RuntimeError)
        kept = "the previous version is intact" if os.path.exists(path) else "nothing was written"
        raise LapoError(f"could not write {path} ({getattr(e, 'strerror', None) or e}); {kept}") from None
    finally:
        with contextlib.suppress(OSError):  # (after the rename there is none)
            os.remove(tmp)

def save_npz(f, arrays):
    """np.savez's layout (one uncompressed .npy member per array), with the zip closed even when a write fails."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, value in arrays.items():
            with z.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)

def save_atomic(obj, path):
    write_atomic(path, lambda f: torch.save(obj, f))

def write_json(path, obj):
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))

def write_summary(out, name, summary):
    write_json(os.path.join(out, f"{name}_summary.json"), summary)
    print(json.dumps(summary), flush=True)

def load_checkpoint(path, kinds):
    if not os.path.isfile(path):
        raise LapoError(f"checkpoint {path} not found")
    try:  # weights_only: tensors and plain values only, so that loading a shared file never runs its code
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LapoError(f"refused to load {path} ({type(e).__name__}): not a readable checkpoint of lapo.py, which "
                        "holds only tensors and plain values (loading anything else could run code)") from None
    if not isinstance(ck, dict) or ck.get("kind") not in kinds:
        raise LapoError(f"{path} is not a {'/'.join(kinds)} checkpoint of lapo.py")
    return ck

# Flags that may differ when a run is resumed: where it runs, its precision, its logging (same flags, same result).
RUNTIME_KEYS = {"cmd", "preset", "device", "resume", "out", "data", "log_every", "ckpt_every", "amp", "max_chunks",
                "eval_every", "ckpt_every_updates", "eval_episodes", "eval_max_steps", "greedy", "expert_return",
                "func", "episodes", "track", "wandb_project", "wandb_entity", "torch_deterministic"}

def config_of(args):
    return {k: v for k, v in vars(args).items() if k != "func"}

def resume_checkpoint(path, kind, args):
    """The checkpoint to continue from (None: none yet); refuses to overwrite without --resume or to mix configs."""
    if not os.path.exists(path):
        return None
    if not args.resume:
        raise LapoError(f"{path} already exists; pass --resume to continue that run, or choose another --out")
    ck = load_checkpoint(path, (kind,))
    saved, current = ck["config"], config_of(args)
    diff = {k: f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if k not in RUNTIME_KEYS and saved.get(k) != current.get(k)
            and (saved.get(k) or current.get(k))}  # a flag added or removed since, switched off: no change
    if diff:  # first what it trained on, recorded in its config by the stages: the data, the earlier stages' runs
        shown = sorted(diff, key=lambda k: k not in ("data_identity", "stage1_run", "stage2_run"))[:4]
        raise LapoError(f"{path} was made with other inputs or flags ({'; '.join(diff[k] for k in shown)}); resume it "
                        "with the data, earlier stages and flags it started with, or use another --out")
    return ck

def log_metrics(out, stage, metrics, line=None):
    """Append the metrics to <out>/metrics.jsonl, namespaced by stage (`stage1/fdm_loss`); print `line`."""
    metrics = {"stage": stage, "time": time.time(), **{f"{stage}/{k}": v for k, v in metrics.items()}}
    path = os.path.join(out, "metrics.jsonl")
    try:  # one write of the whole line; where a killed writer left half a line, a newline first, so it stays alone
        with open(path, "a+b") as f:
            torn = f.tell() > 0 and os.pread(f.fileno(), 1, f.tell() - 1) != b"\n"
            f.write(b"\n" * torn + (json.dumps(metrics) + "\n").encode())
    except OSError as e:  # a full disk: one line, like a failed checkpoint write
        raise LapoError(f"could not append to {path} ({e.strerror or e}); checkpoints already written are intact")
    scalars = {k: v for k, v in metrics.items()  # numbers only: not None, lists or bools
               if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for track in TRACKERS:  # the same scalars to TensorBoard, and to W&B with --track
        track(out, scalars, int(scalars.get(f"{stage}/step", scalars.get(f"{stage}/frames", 0))))
    if line:
        print(line, flush=True)

def tensorboard(out, scalars, step, writers={}):  # noqa: B006 (one writer per run folder, kept open)
    """TensorBoard event files in the run folder, beside metrics.jsonl: `tensorboard --logdir runs` shows them."""
    if out not in writers:
        from torch.utils.tensorboard import SummaryWriter  # (imported on first use: it takes 2 s)
        writers[out] = SummaryWriter(out)
    for k, v in scalars.items():
        writers[out].add_scalar(k, v, step)
    writers[out].flush()

def wandb_logger(args):
    """--track: the same scalars to W&B, whose run starts with the first (its config then holds the run's inputs)."""
    import wandb
    started = []

    def log(out, scalars, step):
        if not started:
            started.append(wandb.init(project=args.wandb_project, entity=args.wandb_entity, config=config_of(args),
                                      name=f"{args.cmd}-{os.path.basename(os.path.abspath(args.out))}-s{args.seed}"))
        wandb.log(scalars)
    return log

TRACKERS = [tensorboard]  # main adds wandb_logger with --track

class Parser(argparse.ArgumentParser):
    """argparse whose errors (an unknown preset, a missing flag, a value out of range) are LapoErrors: one line."""

    def error(self, message):
        raise LapoError(f"{self.prog}: {message} (see --help)")

COMMANDS = {"collect": ("record Procgen rollouts in the authors' layout", collect),
            "stage1": ("train the latent IDM + FDM (no actions used)", lambda a: stage1(a)),
            "stage2": ("behaviour-clone the latent policy on IDM latents", lambda a: stage2(a)),
            "stage3": ("decode latent actions: offline (labeled frames) or online (PPO)",
                       lambda a: stage3_offline(a) if a.mode == "offline" else stage3_online(a)),
            "expert": ("PPO from scratch on the true actions (expert, or the baseline)", expert),
            "eval": ("evaluate any saved policy checkpoint", eval_cmd)}

def build_parser():
    """The command line, from FLAGS: every flag's --help states its range and its value under each preset."""
    p = Parser(description="LAPO: Learning to Act without Actions (single-file reference)")
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd, (text, func) in COMMANDS.items():
        sp = sub.add_parser(cmd, help=text)
        sp.set_defaults(func=func)
        for names, cmds, type, default, text, kw in FLAGS:
            if cmd in cmds:
                shown = (f" (paper {default[0]}, small {default[1]}, tiny {default[2]})" if isinstance(default, P)
                         else "" if default is None or isinstance(default, bool) else f" (default {default})")
                text += shown + (f" [{type.range}]" if hasattr(type, "range") else "")
                sp.add_argument(*names, default=default, help=text, **({"type": type} if type else {}), **kw)
    return p

def parse_args(argv=None):
    """The command line -> args: every flag left at its P(paper, small, tiny) default takes the value of --preset;
    then the checks one flag's range cannot make: combinations, and values that must match the data or other flags."""
    args = build_parser().parse_args(argv)
    for k, v in list(vars(args).items()):
        if isinstance(v, P):
            setattr(args, k, v[PRESETS.index(args.preset)])
    if args.cmd == "stage1" and args.latent_dim % (args.code_dim * args.num_codebooks):  # equal vectors per codebook
        raise LapoError("stage1: --latent-dim must split into --code-dim vectors, an equal number per codebook "
                        f"(got {args.latent_dim} / {args.code_dim} over {args.num_codebooks} codebooks)")
    if args.cmd == "stage3" and args.mode == "offline" and args.data is None:
        raise LapoError("stage3 --mode offline needs --data DIR/GAME: the action-labeled frames to decode with")
    if args.cmd == "collect" and min(args.chunk_len, args.test_chunk_len) < 3 * args.num_envs:  # a window is 3 frames
        raise LapoError(f"collect: --chunk-len and --test-chunk-len must give each of the --num-envs {args.num_envs} "
                        f"envs 3 frames in a row, so at least {3 * args.num_envs}; raise them or lower --num-envs")
    if args.cmd == "expert" or getattr(args, "mode", None) == "online":  # the commands that run PPO
        rollout = args.num_envs * args.num_steps
        if args.frames < rollout:
            raise LapoError(f"{args.cmd}: --frames {args.frames} is less than one PPO rollout (--num-envs x "
                            f"--num-steps = {rollout}); raise --frames or lower those")
        if rollout // args.num_minibatches < 2:
            raise LapoError(f"{args.cmd}: --num-minibatches {args.num_minibatches} leaves fewer than 2 samples per "
                            f"minibatch of a {rollout}-frame rollout")
    if getattr(args, "track", False) and importlib.util.find_spec("wandb") is None:
        raise LapoError("--track logs to Weights & Biases, which is not installed: pip install wandb")
    if args.cmd != "eval":
        check_out(args.out)
    return args

# The flags that size what a command holds in memory: the line for an allocation the machine refuses names its own.
SIZE_FLAGS = ("--num-envs", "--num-steps", "--chunk-len", "--batch-size", "--max-chunks", "--impala-scale",
              "--fdm-width", "--codebook-size")

def main(argv=None, parse=parse_args, interrupted="the last checkpoint is intact, continue with --resume"):
    """Run args.func (lapo's commands, or a tool's) holding its --out. A user error is one line and exit code 2, and so
    is an allocation the machine refuses (a size the kernel accepts, then cannot back, ends with its kill instead)."""
    args = None
    try:
        args = parse(argv)
        with run_lock(args.out) if ddp_rank(args) == 0 and getattr(args, "out", None) else contextlib.nullcontext():
            if getattr(args, "track", False):
                TRACKERS.append(wandb_logger(args))
            args.func(args)
        if dist.is_initialized():  # (here, with the stage's DDP modules gone: destroyed under them, gloo can hang)
            dist.destroy_process_group()
    except LapoError as e:
        if ddp_world()[0] and not dist.is_initialized():  # before they meet, the ranks refuse alike: rank 0 says it,
            time.sleep(2)  # and torchrun ends this rank (were it still alive, its refusal is its own)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:  # exactly: Python's own, CUDA's and torch's CPU allocator's refusals
        if dist.is_initialized() and "peer" in str(e):  # under torchrun: another rank failed (and said why)
            sys.exit(1)
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "DefaultCPUAllocator: can't" not in str(e):
            raise
        sizes = [n for names, cmds, *_ in FLAGS if getattr(args, "cmd", None) in cmds for n in names if n in SIZE_FLAGS]
        print(f"error: out of memory ({(str(e).splitlines() or [type(e).__name__])[0]}); lower "
              f"{', '.join(sizes) or 'its sizes'}; {getattr(args, 'on_interrupt', interrupted)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"interrupted; {getattr(args, 'on_interrupt', interrupted)}", file=sys.stderr)
        sys.exit(130)

if __name__ == "__main__":
    main()
