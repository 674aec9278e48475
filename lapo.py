"""LAPO: Learning to Act without Actions (Schmidt & Jiang, ICLR 2024, arXiv 2312.10812).

One file, read top to bottom like the paper:
  configuration & utilities -> data (collect, load, windows) -> networks (IMPALA CNN, VQ, IDM, FDM U-Net,
  decoder, agents) -> stage 1 (latent IDM + FDM) -> stage 2 (latent behaviour cloning) -> stage 3
  (offline decoding, online decoding with PPO) -> PPO -> evaluation -> pipeline -> bench -> command line.

    python lapo.py collect --env bigfish --out data            # observation-only video (+ labeled test split)
    python lapo.py stage1  --data data/bigfish --out runs/bigfish   # latent IDM + FDM, no actions used
    python lapo.py stage2  --data data/bigfish --out runs/bigfish   # latent policy pi(o_t) -> z_t
    python lapo.py stage3  --mode offline --labels 256 --data data/bigfish --out runs/bigfish
    python lapo.py stage3  --mode online --out runs/bigfish         # PPO with the RL+SL policy
    python lapo.py pipeline --env bigfish --preset small --out runs/demo  # all of it + baselines, results.md, plots
    python lapo.py bench   --preset paper                           # throughput of every stage on this machine
Every command takes --preset paper|small|tiny (default paper; pipeline: small); explicit flags override it.
"""
import argparse
import contextlib
import copy
import io
import json
import math
import os
import shutil
import sys
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ==============================================================================================
# CONFIGURATION AND UTILITIES
# ==============================================================================================
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
          "miner": (1.251, 11.893), "ninja": (2.560, 9.475), "plunder": (4.321, 11.461),
          "starpilot": (1.525, 66.986)}

# Presets: `paper` is the paper's configuration (meant for a GPU), `small` runs on a 2-core CPU in minutes
# and still learns useful latents, `tiny` takes seconds (tests). Keys prefixed "cmd." apply to one command.
PRESETS = {
    "paper": dict(
        frames=2_621_440, test_frames=65_536,                     # 80 train chunks, like the authors' default
        impala_scale=4, fdm_width=24, batch_size=128,
        stage1_steps=50_000, stage2_steps=60_000, eval_every=500, ckpt_every=2000,
        eval_windows=1024, probe_windows=4096, vq_decay=0.999, vq_restart=0.0, fdm_residual=0, idm_diff=0,
        eval_episodes=64, decoder_steps=2000, bc_steps=2000, labels="16,64,256,1024",
        **{"stage1.lr": 3e-4, "stage2.lr": 2e-4,
           "online.frames": 4_000_000, "online.num_envs": 64, "online.num_steps": 64, "online.lr": 1e-2,
           "online.ent_coef": 0.0025, "online.schedule_scale": 1.0,
           "expert.frames": 25_000_000, "expert.num_envs": 64, "expert.num_steps": 256, "expert.lr": 5e-4,
           "expert.ent_coef": 0.01, "expert.impala_scale": 1, "collect.num_envs": 64}),
    "small": dict(
        frames=65_536, test_frames=8192,
        impala_scale=1, fdm_width=8, batch_size=64,
        stage1_steps=3000, stage2_steps=2000, eval_every=500, ckpt_every=500,
        eval_windows=512, probe_windows=2048, vq_decay=0.99, vq_restart=0.0,  # faster EMA: 3k steps, not 50k
        fdm_residual=1, idm_diff=1,  # CPU budget: see README 'Deviations' (measured: probe 0.139 vs 0.090 at 500 steps)
        eval_episodes=64, decoder_steps=1000, bc_steps=500, labels="16,64,256,1024",
        # PPO budgets by measurement (2 CPU cores with bf16): an IMPALA-0.5 PPO runs ~720 env frames/s, and in 262k
        # frames it reached 7.2 on maze, 4.6 (scale 1, 328k) on starpilot, ~1-2 on miner, dodgeball, bossfight
        **{"stage1.lr": 1e-3, "stage2.lr": 5e-4,  # short runs learn faster with a higher peak LR (measured)
           "online.frames": 131_072, "online.num_envs": 32, "online.num_steps": 64, "online.lr": 1e-2,
           "online.ent_coef": 0.0025, "online.schedule_scale": 0.25,  # SL until 100k frames, RL head from 8.75k
           "expert.frames": 786_432, "expert.num_envs": 32, "expert.num_steps": 128, "expert.lr": 5e-4,
           "expert.ent_coef": 0.01, "expert.impala_scale": 0.5, "collect.num_envs": 64}),
    "tiny": dict(
        frames=2048, test_frames=1024,
        impala_scale=0.25, fdm_width=4, batch_size=16,
        stage1_steps=30, stage2_steps=30, eval_every=15, ckpt_every=15,
        eval_windows=64, probe_windows=256, vq_decay=0.9, vq_restart=0.0, fdm_residual=1, idm_diff=1,
        eval_episodes=2, decoder_steps=50, bc_steps=50, labels="16,64",
        **{"stage1.lr": 1e-3, "stage2.lr": 5e-4,
           "online.frames": 2048, "online.num_envs": 8, "online.num_steps": 32, "online.lr": 1e-2,
           "online.ent_coef": 0.0025, "online.schedule_scale": 0.01,
           "expert.frames": 2048, "expert.num_envs": 8, "expert.num_steps": 32, "expert.lr": 5e-4,
           "expert.ent_coef": 0.01, "expert.impala_scale": 0.25, "collect.num_envs": 8, "eval_max_steps": 200}),
}
# Flags that change nothing about what is computed: they may differ when a run is resumed.
RUNTIME_KEYS = {"cmd", "preset", "device", "resume", "out", "data", "log_every", "ckpt_every", "amp",
                "max_chunks", "eval_every", "eval_episodes", "eval_max_steps", "func", "episodes"}


class LapoError(Exception):
    """A user-facing error: printed as one line by main(), never as a traceback."""


def seed_everything(seed):
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(args):
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise LapoError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(args.device)


def use_amp(args, device):
    """bf16 autocast where the hardware runs it fast: CUDA, and CPUs with bf16 units (AMX/AVX512-BF16)."""
    if args.amp == "auto":
        return device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return args.amp == "on"


def autocast(device, enabled):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def preprocess(frames):
    """uint8 frames (B, H, W, C) or windows (B, K, H, W, C) -> float (B, K*C, H, W) in [-0.5, 0.5].
    Called on the device: frames travel as uint8 (4x fewer bytes) and are scaled there."""
    x = frames.float().div_(255.0).sub_(0.5)
    if x.dim() == 5:
        b, k, h, w, c = x.shape
        x = x.permute(0, 1, 4, 2, 3).reshape(b, k * c, h, w)
        return x.contiguous(memory_format=torch.channels_last)
    return x.permute(0, 3, 1, 2)  # a view of NHWC memory, i.e. already channels_last


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, kinds):
    if not os.path.isfile(path):
        raise LapoError(f"checkpoint {path} not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise LapoError(f"cannot read checkpoint {path} ({type(e).__name__}); it is corrupt or not from lapo.py")
    if not isinstance(ck, dict) or ck.get("kind") not in kinds:
        raise LapoError(f"{path} is not a {'/'.join(kinds)} checkpoint of lapo.py")
    return ck


def check_same_config(saved, current, path):
    diff = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if k not in RUNTIME_KEYS and saved.get(k) != current.get(k)]
    if diff:
        raise LapoError(f"{path} was made with a different configuration ({'; '.join(diff[:4])}); "
                        "rerun with the same flags, or use another --out")


def config_of(args):
    return {k: v for k, v in vars(args).items() if k != "func"}


def fmt_time(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Logger:
    """Prints progress lines and appends every metric dict to <out>/metrics.jsonl (namespaced by stage)."""

    def __init__(self, out):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "metrics.jsonl")

    def log(self, stage, metrics, line=None):
        with open(self.path, "a") as f:
            f.write(json.dumps({"stage": stage, "time": time.time(),
                                **{f"{stage}/{k}": v for k, v in metrics.items()}}) + "\n")
        if line:
            print(line, flush=True)


def write_json(path, obj):
    with open(f"{path}.tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(f"{path}.tmp", path)


def read_json(path):
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError:
        raise LapoError(f"{path} is corrupt; delete it (the step that wrote it will rerun)")


def write_summary(out, name, summary):
    write_json(os.path.join(out, f"{name}_summary.json"), summary)
    print(json.dumps(summary), flush=True)


def normalized_return(game, mean_return, expert_return=None):
    if game not in SCORES:
        return None
    lo, hi = SCORES[game]
    hi = expert_return if expert_return is not None else hi
    return (mean_return - lo) / (hi - lo)


# ==============================================================================================
# DATA: Procgen environments, collection in the authors' layout, loading, windows
# ==============================================================================================
def check_game(game):
    if game not in GAMES:
        raise LapoError(f"unknown game {game!r}; choose one of: {', '.join(GAMES)}")


class Envs:
    """Procgen vector env (easy mode, full level distribution) that also tracks episode returns."""

    def __init__(self, game, num_envs, seed):
        check_game(game)
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gym 0.26 prints a deprecation banner on import
            from procgen import ProcgenEnv
        self.env = ProcgenEnv(num_envs=num_envs, env_name=game, distribution_mode="easy",
                              num_levels=0, start_level=0, rand_seed=int(seed))
        self.num_envs = num_envs
        self.ret = np.zeros(num_envs, np.float64)
        self.len = np.zeros(num_envs, np.int64)

    def reset(self):
        return self.env.reset()["rgb"]

    def step(self, actions):
        """-> obs, reward, done, finished. done[i]: env i's episode ended with this step and obs[i] is
        already the first frame of its next episode (Procgen resets by itself)."""
        obs, rew, done, _ = self.env.step(np.asarray(actions, dtype=np.int32))
        self.ret += rew
        self.len += 1
        finished = [(i, float(self.ret[i]), int(self.len[i])) for i in np.flatnonzero(done)]
        self.ret[done] = 0.0
        self.len[done] = 0
        return obs["rgb"], rew.astype(np.float32), done.astype(bool), finished

    def close(self):
        self.env.close()


def save_npz_atomic(path, **arrays):
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def collect(args):
    """Record rollouts in the authors' layout <out>/<game>/{train,test}/<i>.npz.

    Layout of a chunk: the num_envs trajectories of one round, each env's segment contiguous and in time
    order. Per frame i: obs[i] (64,64,3) uint8, ta[i] the action taken at obs[i], rewards[i] the reward of
    that step, values[i] the policy's value estimate (0 for the random policy), and
    done[i] = True iff obs[i+1] does not continue obs[i]'s episode: the episode ended with this step, or
    this env's recorded segment ends here. ep_returns[i] is the episode's return where it ended at frame i,
    NaN elsewhere. Loaders must not build windows across done[i] (the authors' files use the same flag)."""
    check_game(args.env)
    device = get_device(args)
    agent = None
    if args.policy != "random":
        agent, meta = load_policy(args.policy, device)
        if meta.get("game") not in (None, args.env):
            raise LapoError(f"{args.policy} was trained on {meta['game']}, not {args.env}")
    amp, summaries = use_amp(args, device), {}
    args.collected = summaries  # each split's summary, for callers (bench)
    for split, frames, seed in (("train", args.frames, args.seed), ("test", args.test_frames, args.seed + 10_000)):
        folder = os.path.join(args.out, args.env, split)
        if os.path.isdir(folder) and any(f.endswith(".npz") for f in os.listdir(folder)):
            raise LapoError(f"{folder} already holds chunks; delete it or choose another --out")
        os.makedirs(folder, exist_ok=True)
        chunk_len = args.chunk_len if split == "train" else args.test_chunk_len
        envs = Envs(args.env, args.num_envs, seed)
        obs = envs.reset()
        rng = np.random.default_rng(seed)
        t0, done_frames, ep_returns, i = time.time(), 0, [], 0
        while done_frames < frames:
            steps = max(1, min(chunk_len, frames - done_frames) // args.num_envs)
            buf = {k: [] for k in ("obs", "ta", "rewards", "done", "values", "ep_returns")}
            for _ in range(steps):
                if agent is None:
                    act, val = rng.integers(0, NUM_ACTIONS, args.num_envs), np.zeros(args.num_envs, np.float32)
                else:
                    act, val = agent.act(torch.from_numpy(obs).to(device), sample=True, amp=amp)
                nxt, rew, done, finished = envs.step(act)
                epr = np.full(args.num_envs, np.nan, np.float32)
                for e, ret, _ in finished:
                    epr[e] = ret
                    ep_returns.append(ret)
                for k, v in zip(buf, (obs, act, rew, done, val, epr)):
                    buf[k].append(np.asarray(v))
                obs = nxt
            # (steps, envs, ...) -> (envs, steps, ...): each env's segment contiguous in time order
            chunk = {k: np.stack(v, 1).reshape(-1, *np.asarray(v[0]).shape[1:]) for k, v in buf.items()}
            chunk["done"].reshape(args.num_envs, steps)[:, -1] = True  # segment ends: no window may cross
            chunk["ta"] = chunk["ta"].astype(np.int64)
            save_npz_atomic(os.path.join(folder, f"{i}.npz"), **chunk)
            done_frames += len(chunk["obs"])
            i += 1
            el = time.time() - t0
            mean = f"{np.mean(ep_returns[-100:]):.2f}" if ep_returns else "n/a"
            print(f"collect {args.env}/{split}: {done_frames}/{frames} frames | {done_frames / el:.0f} frames/s | "
                  f"{len(ep_returns)} episodes, mean return {mean} | eta {fmt_time(el / done_frames * (frames - done_frames))}",
                  flush=True)
        envs.close()
        summaries[split] = {"frames": done_frames, "chunks": i, "episodes": len(ep_returns),
                            "mean_return": float(np.mean(ep_returns)) if ep_returns else None,
                            "frames_per_s": done_frames / (time.time() - t0)}
    write_summary(os.path.join(args.out, args.env), "collect", {"game": args.env, "policy": args.policy, **summaries})
    return os.path.join(args.out, args.env)


def _npz_member(z, key):
    """Open array `key` of an open .npz (zip) and read its .npy header. -> (file at the data, shape, fortran, dtype)"""
    f = z.open(f"{key}.npy")
    version = np.lib.format.read_magic(f)
    shape, fortran, dtype = np.lib.format._read_array_header(f, version)
    return f, shape, fortran, dtype


def _read_into(f, out):
    """Stream raw bytes from `f` straight into the contiguous array `out`: no temporary copy of the chunk."""
    view, got = memoryview(out).cast("B"), 0
    while got < len(view):
        n = f.readinto(view[got:got + (1 << 20)])  # 1 MiB at a time: the only temporary buffer
        if not n:
            raise EOFError("chunk ends early")
        got += n


class FrameData:
    """All frames of one split in ONE contiguous uint8 array (N, 64, 64, 3); windows are gathered by index.

    centres: every t whose window (o_{t-1}, o_t, o_{t+1}) stays inside one episode and one chunk."""

    def __init__(self, obs, done, ta=None, chunk_ends=(), name="data", game=None):
        self.obs = torch.from_numpy(obs) if isinstance(obs, np.ndarray) else obs
        self.name, self.game, n = name, game, len(obs)
        brk = np.asarray(done, bool).copy()
        brk[list(chunk_ends)] = True
        brk[-1] = True
        ok = np.zeros(n, bool)
        ok[1:-1] = ~brk[:-2] & ~brk[1:-1]  # o_{t-1}->o_t and o_t->o_{t+1} are both real transitions
        self.centres = torch.from_numpy(np.flatnonzero(ok))
        self.ta = None if ta is None else torch.as_tensor(np.asarray(ta), dtype=torch.int64)
        if len(self.centres) == 0:
            raise LapoError(f"{name}: no window of 3 consecutive frames inside an episode; the data is too short")

    def __len__(self):
        return len(self.obs)

    def to(self, device):
        """Move the uint8 frames to the device (on a GPU the whole dataset fits: 12 KiB per frame)."""
        self.obs = self.obs.to(device)
        self.centres = self.centres.to(device)
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


def load_split(folder, split, max_chunks=None):
    """Load <folder>/<split>/<i>.npz (the authors' files or ours) into a FrameData, memory ~ raw frame bytes."""
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
    names = names[:max_chunks] if max_chunks else names
    paths = [os.path.join(d, f) for f in names]
    sizes, has_ta = [], True
    for p in paths:
        try:
            with zipfile.ZipFile(p) as z:
                f, shape, fortran, dtype = _npz_member(z, "obs")
                f.close()
                has_ta &= "ta.npy" in z.namelist()
        except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
            raise LapoError(f"corrupt chunk {p} ({type(e).__name__}: {e}); delete it or re-run collect")
        if len(shape) != 4 or shape[1:] != (64, 64, 3) or dtype != np.uint8 or fortran:
            raise LapoError(f"{p}: obs must be uint8 (N, 64, 64, 3) in C order, found {dtype} {shape}")
        sizes.append(shape[0])
    n = sum(sizes)
    obs = np.empty((n, 64, 64, 3), np.uint8)  # one allocation; each chunk's bytes are streamed into it
    done = np.zeros(n, bool)
    ta = np.zeros(n, np.int64) if has_ta else None
    ends, o = [], 0
    for p, s in zip(paths, sizes):
        try:
            with np.load(p) as z:
                with _npz_member(z.zip, "obs")[0] as f:  # obs streamed in; the small arrays through np.load
                    _read_into(f, obs[o:o + s])
                if "done" in z.files:
                    done[o:o + s] = np.asarray(z["done"]).reshape(-1)[:s]
                if ta is not None:
                    ta[o:o + s] = np.asarray(z["ta"]).reshape(-1)[:s]
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as e:
            raise LapoError(f"corrupt chunk {p} ({type(e).__name__}); delete it or re-run collect")
        o += s
        ends.append(o - 1)
    if ta is not None and (ta.min() < 0 or ta.max() >= NUM_ACTIONS):
        raise LapoError(f"{d}: actions 'ta' must lie in [0, {NUM_ACTIONS})")
    game = os.path.basename(os.path.normpath(folder))
    return FrameData(obs, done, ta, ends, name=f"{folder}/{split}", game=game if game in GAMES else None)


# ==============================================================================================
# NETWORKS: IMPALA CNN, VQ bottleneck, IDM, FDM (U-Net), decoder, agents
# ==============================================================================================
class ResBlock(nn.Module):
    def __init__(self, c, norm=False):
        super().__init__()
        self.conv0 = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.BatchNorm2d(c) if norm else nn.Identity()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv1(F.relu(self.norm(self.conv0(F.relu(x)))))


class ImpalaCNN(nn.Module):
    """IMPALA CNN: 3 x [conv3x3, maxpool 3x3/2, 2 res blocks] -> flatten -> relu -> fc -> relu -> head.
    Channels (16, 32, 32) x scale (paper: 4). `features` is the 256-unit layer that PPO heads build on."""

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

    def __init__(self, latent_dim=128, code_dim=16, num_codebooks=2, codebook_size=64, decay=0.999, eps=1e-5,
                 restart=0.0):
        super().__init__()
        self.restart = restart  # codes whose EMA count falls below this are re-seeded (0: never, as in the paper)
        n_vec = latent_dim // code_dim
        assert latent_dim % code_dim == 0 and n_vec % num_codebooks == 0, "latent must split evenly"
        self.G, self.K, self.D, self.per = num_codebooks, codebook_size, code_dim, n_vec // num_codebooks
        self.decay, self.eps = decay, eps
        init = (torch.rand(self.G, self.K, self.D) * 2 - 1) * 5 / 64
        self.register_buffer("codebook", init)
        self.register_buffer("cluster_size", torch.ones(self.G, self.K))  # EMA of code counts
        self.register_buffer("embed_sum", init.clone())  # EMA of sums of latents assigned to each code

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
            perplexity = torch.exp(-(usage * torch.log(usage + 1e-10)).sum(-1)).mean()
            zq = q.view(self.G, b, self.per, self.D).transpose(0, 1).reshape(b, -1)
            codes = idx.view(self.G, b, self.per).transpose(0, 1).reshape(b, -1)
        return zq, commit, codes, perplexity

    @torch.no_grad()
    def _ema_update(self, zg, onehot):
        self.cluster_size.mul_(self.decay).add_(onehot.sum(1), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(torch.bmm(onehot.transpose(1, 2), zg), alpha=1 - self.decay)
        n = self.cluster_size.sum(-1, keepdim=True)
        smoothed = (self.cluster_size + self.eps) / (n + self.K * self.eps) * n  # Laplace smoothing
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(-1))
        if self.restart > 0:  # dead-code restart: move unused codes onto random latents of this batch
            dead = self.cluster_size < self.restart
            pick = torch.randint(zg.shape[1], dead.shape, device=zg.device)
            fresh = torch.gather(zg, 1, pick.unsqueeze(-1).expand(-1, -1, self.D))
            self.codebook.copy_(torch.where(dead.unsqueeze(-1), fresh, self.codebook))
            self.embed_sum.copy_(torch.where(dead.unsqueeze(-1), fresh, self.embed_sum))
            self.cluster_size.masked_fill_(dead, 1.0)


DIFF_GAIN = 8.0  # frame differences are small (most pixels do not change); scale them to the frames' range


class IDM(nn.Module):
    """Latent inverse dynamics model: (o_{t-1}, o_t, o_{t+1}) -> continuous latent z_t -> VQ -> z_q.

    diff_input re-expresses the stacked frames as (o_t, o_t - o_{t-1}, o_{t+1} - o_t): the same information
    (the map is linear and invertible), but the change, which carries the action, no longer has to be found by
    the first convolution under a bright static background. The paper feeds the frames (diff_input=False)."""

    def __init__(self, scale=4.0, latent_dim=128, vq=True, code_dim=16, num_codebooks=2, codebook_size=64,
                 vq_decay=0.999, vq_restart=0.0, diff_input=False):
        super().__init__()
        self.diff_input = diff_input
        self.encoder = ImpalaCNN(9, latent_dim, scale)
        self.vq = VectorQuantizer(latent_dim, code_dim, num_codebooks, codebook_size, vq_decay,
                                  restart=vq_restart) if vq else None

    def forward(self, window):
        x = preprocess(window)
        if self.diff_input:  # (o_t, 8(o_t - o_{t-1}), 8(o_{t+1} - o_t)): an invertible linear map of the same frames
            prev, cur, nxt = x[:, :3], x[:, 3:6], x[:, 6:]
            x = torch.cat([cur, DIFF_GAIN * (cur - prev), DIFF_GAIN * (nxt - cur)], 1)
        z = self.encoder(x)
        if self.vq is None:  # the paper's no-VQ ablation: the FDM sees the continuous latent
            zero = z.new_zeros((), dtype=torch.float32)
            return {"z": z, "zq": z, "commit": zero, "perplexity": zero}
        zq, commit, codes, perplexity = self.vq(z)
        return {"z": z, "zq": zq, "commit": commit, "codes": codes, "perplexity": perplexity}


class ConvBlock(nn.Module):
    """conv3x3 -> BatchNorm -> relu (-> residual layer): the unit of both U-Net paths."""

    def __init__(self, cin, cout, res=True):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)
        self.res = ResBlock(cout, norm=True) if res else nn.Identity()

    def forward(self, x, bias=None):
        x = self.conv(x)
        return self.res(F.relu(self.norm(x if bias is None else x + bias)))


class TiledLatentConv(nn.Module):
    """What a conv3x3 sees of a latent tiled over the image and concatenated to its input, computed exactly
    without materializing the tiled map: each kernel tap adds W_tap @ z wherever that tap lands inside the
    (zero-padded) image. Saves a (latent_dim)-channel convolution at full resolution."""

    def __init__(self, latent_dim, cout, size=64):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, latent_dim, 3, 3) / math.sqrt(9 * (latent_dim + 6)))
        inside = F.pad(torch.ones(1, 1, size, size), (1, 1, 1, 1))
        masks = torch.stack([inside[0, 0, i:i + size, j:j + size] for i in range(3) for j in range(3)])
        self.register_buffer("masks", masks)  # (9, H, W): 1 where tap (i, j) reads inside the image

    def forward(self, z):
        per_tap = torch.einsum("bc,ock->bok", z, self.weight.flatten(2).to(z.dtype))  # (B, cout, 9)
        return torch.einsum("bok,khw->bohw", per_tap, self.masks.to(z.dtype))


class FDM(nn.Module):
    """Forward dynamics U-Net: (o_{t-1}, o_t, z_q) -> o_{t+1}. The latent is tiled over the image at the input
    and concatenated again at the 1x1 bottleneck; the output head sees the input frames again.
    64x64 -> 5 down blocks (w, 2w, 4w, 8w, 16w) with max-pool -> 2x2 conv to 32w at 1x1 -> mirrored up path
    (transposed conv, concat skip, conv block)."""

    def __init__(self, latent_dim=128, width=24, depth=5, residual=False):
        super().__init__()
        widths = [width * 2 ** i for i in range(depth)]
        self.residual = residual
        self.z_in = TiledLatentConv(latent_dim, width)  # the latent's share of the first conv
        self.down = nn.ModuleList()
        c = 6
        for w in widths:
            self.down.append(ConvBlock(c, w))
            c = w
        self.mid = nn.Conv2d(c, 2 * c, 2)
        c = 2 * c + latent_dim
        self.ups, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for skip, out in zip([widths[-1]] + widths[::-1], widths[::-1] + [width]):
            self.ups.append(nn.ConvTranspose2d(c, skip, 2, stride=2))
            self.up_blocks.append(ConvBlock(2 * skip, out, res=False))
            c = out
        self.head = nn.Sequential(nn.Conv2d(c + 6, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 3, 1))
        if residual:  # start as an exact copy of o_t, so all learning goes into what changes
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    def forward(self, frames, zq):
        """frames uint8 (B, 2, H, W, C) = (o_{t-1}, o_t); zq (B, latent) -> prediction of o_{t+1} in [-0.5, 0.5]."""
        x = x_in = preprocess(frames)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x, self.z_in(zq.to(x.dtype)) if i == 0 else None)  # = conv(cat(frames, tiled z))
            skips.append(x)
            x = F.max_pool2d(x, 2)
        skips.append(x)
        x = torch.cat([F.relu(self.mid(x)), zq.to(x.dtype)[:, :, None, None]], 1)  # latent again at 1x1
        for up, block in zip(self.ups, self.up_blocks):
            x = block(torch.cat([up(x), skips.pop()], 1))
        out = self.head(torch.cat([x, x_in.to(x.dtype)], 1))
        if self.residual:  # o_{t+1} = o_t + change (the change lies in [-1, 1])
            return x_in[:, 3:].to(out.dtype) + torch.tanh(out)
        return torch.tanh(out) / 2  # the paper's output, in the range of the scaled frames


class Decoder(nn.Module):
    """Latent action z (128) -> logits over the 15 real actions. It is the only part that ever sees actions.

    Its input is standardized with the statistics of the latents it is fit on (fit_input): latents live near the
    VQ codes (initialized within +-5/64), with a per-dimension std of about 0.02 (measured), and an MLP on inputs
    that small learns slowly. On starpilot IDM latents, 59 Adam steps reached 0.40 accuracy standardized, 0.30 raw."""

    def __init__(self, latent_dim=128, hidden=(192, 128, 64)):
        super().__init__()
        layers, c = [], latent_dim
        for h in hidden:
            layers += [nn.Linear(c, h), nn.ReLU()]
            c = h
        self.net = nn.Sequential(*layers, nn.Linear(c, NUM_ACTIONS))
        self.register_buffer("mean", torch.zeros(latent_dim))
        self.register_buffer("std", torch.ones(latent_dim))

    def fit_input(self, z):
        self.mean.copy_(z.mean(0))
        self.std.copy_(z.std(0) + 1e-6)
        return self

    def forward(self, z):
        return self.net((z.float() - self.mean) / self.std)


class Agent(nn.Module):
    """An actor-critic over uint8 frames: forward(obs (B,64,64,3) uint8) -> (logits, value or None).

    forward = heads(encode(obs)). encode is the part PPO never trains (identity by default); PPO computes it
    once per frame in the rollout and reuses it in every update epoch."""

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
        self.value = nn.Linear(256, 1)
        nn.init.orthogonal_(self.net.head.weight, 0.01)  # near-uniform initial policy
        nn.init.zeros_(self.net.head.bias)

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
    """The paper's RL+SL policy for online decoding.

    logits = mean(RL head(trainable copy of the latent policy's 256-unit layer), decoder(frozen pi(o_t))).
    The RL head starts at zero, so PPO starts from the decoded latent policy and only learns corrections.
    The decoder is trained by supervised learning on IDM-labeled online transitions (not by PPO); with
    sl=False (the no-SL ablation) it is trained by PPO instead, like the RL head."""
    kind = "online"

    def __init__(self, scale=4.0, latent_dim=128, sl=True):
        super().__init__()
        self.policy = ImpalaCNN(3, latent_dim, scale)  # frozen latent policy from stage 2
        self.fc = copy.deepcopy(self.policy.fc)  # trainable copy of the 256-unit layer
        self.rl_head, self.value = nn.Linear(256, NUM_ACTIONS), nn.Linear(256, 1)
        nn.init.zeros_(self.rl_head.weight)
        nn.init.zeros_(self.rl_head.bias)
        self.decoder, self.sl = Decoder(latent_dim), sl
        self.policy.requires_grad_(False)
        self.decoder.requires_grad_(not sl)

    def init_from(self, policy_state, decoder_state=None):
        self.policy.load_state_dict(policy_state)
        self.fc.load_state_dict(self.policy.fc.state_dict())
        if decoder_state is not None:
            self.decoder.load_state_dict(decoder_state)

    @torch.no_grad()
    def encode(self, obs):  # the frozen conv trunk: the costly part, computed once per frame by PPO
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


# ==============================================================================================
# STAGE 1: latent IDM + FDM, trained jointly to predict o_{t+1} through the VQ bottleneck
# ==============================================================================================
def make_lr_fn(total, warmup, start, end):
    """LR multiplier: linear warm-up start->1 over `warmup` steps, then linear 1->end at `total`."""
    def fn(step):
        if step < warmup:
            return start + (1 - start) * step / warmup
        return 1 + (end - 1) * min(1.0, (step - warmup) / max(1, total - warmup))
    return fn


def train_loop(stage, args, modules, opt, lr_fn, train_step, evaluate, total):
    """Shared plumbing of stages 1 and 2: resume, LR schedule, progress lines, eval, atomic checkpoints."""
    path, logger = os.path.join(args.out, f"{stage}.pt"), Logger(args.out)
    gen = torch.Generator().manual_seed(args.seed)  # batch sampling stream, saved for exact resume
    cfg, step = config_of(args), 0
    if os.path.exists(path):
        if not args.resume:
            raise LapoError(f"{path} already exists; pass --resume to continue that run, or choose another --out")
        ck = load_checkpoint(path, (stage,))
        check_same_config(ck["config"], cfg, path)
        for k, m in modules.items():
            m.load_state_dict(ck[k])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        step = ck["step"]
        print(f"{stage}: resumed from {path} at step {step}", flush=True)

    def save(metrics=None):
        save_atomic({"kind": stage, "config": cfg, "step": step, "opt": opt.state_dict(), "gen": gen.get_state(),
                     "torch_rng": torch.get_rng_state(), "metrics": metrics,
                     **{k: m.state_dict() for k, m in modules.items()}}, path)

    t_start, t_eval, t_log, n_log, metrics = time.time(), 0.0, time.time(), 0, {}
    first = step
    while step < total:
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_fn(step)
        for m in modules.values():
            m.train()
        out = train_step(gen)
        step += 1
        n_log += 1
        if step % args.log_every == 0 or step == total:
            out = {k: float(v) for k, v in out.items()}  # the only host sync of the inner loop
            now = time.time()
            sps = n_log * args.batch_size / (now - t_log)
            eta = (now - t_start - t_eval) / (step - first) * (total - step)
            logger.log(stage, {"step": step, "lr": opt.param_groups[0]["lr"], "samples_per_s": sps, **out},
                       f"{stage} step {step}/{total} | " + " ".join(f"{k} {v:.4g}" for k, v in out.items())
                       + f" | lr {opt.param_groups[0]['lr']:.2e} | {sps:.1f} samples/s | eta {fmt_time(eta)}")
            t_log, n_log = time.time(), 0
        if step % args.eval_every == 0 or step == total:
            t0 = time.time()
            metrics = evaluate()
            t_eval += time.time() - t0
            metrics["eval_frac"] = t_eval / max(1e-9, time.time() - t_start)
            logger.log(stage, {"step": step, **metrics},
                       f"{stage} eval step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            t_log += time.time() - t0
        if step % args.ckpt_every == 0 or step == total:
            save(metrics)
    wall = time.time() - t_start
    trained = step - first
    if trained == 0:  # resumed a finished run: report its last metrics
        metrics = load_checkpoint(path, (stage,))["metrics"] or {}
    return {"stage": stage, "step": step, **metrics,
            "samples_per_s": trained * args.batch_size / max(1e-9, wall - t_eval) if trained else None,
            "wall_s": wall}


@torch.no_grad()
def idm_latents(idm, data, centres, device, amp, batch=256):
    """Continuous (pre-quantization) IDM latents of the windows centred at `centres` -> float32 (n, 128) CPU."""
    idm.eval()
    out = []
    for i in range(0, len(centres), batch):
        with autocast(device, amp):
            out.append(idm(data.windows(centres[i:i + batch], device))["z"].float().cpu())
    return torch.cat(out)


def probe_accuracy(z, y, seed=0, steps=300):
    """Held-out probe (the stage-1 health signal): an MLP (2 x 128 hidden) from latent to true action,
    trained on the first half and tested on the second half. -> (accuracy, majority-class rate)."""
    n = len(z) // 2
    mean, std = z[:n].mean(0), z[:n].std(0) + 1e-6
    ztr, zte, ytr, yte = (z[:n] - mean) / std, (z[n:] - mean) / std, y[:n], y[n:]
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # leaves the training RNG stream untouched
        torch.manual_seed(seed)
        mlp = nn.Sequential(nn.Linear(z.shape[1], 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                            nn.Linear(128, NUM_ACTIONS))
        opt = torch.optim.Adam(mlp.parameters(), lr=1e-3, weight_decay=1e-4)
        for _ in range(steps):
            idx = torch.randint(n, (min(n, 256),))
            loss = F.cross_entropy(mlp(ztr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (mlp(zte).argmax(-1) == yte).float().mean().item()
    majority = (yte == torch.bincount(ytr, minlength=NUM_ACTIONS).argmax()).float().mean().item()
    return acc, majority


def build_idm(cfg):
    return IDM(cfg["impala_scale"], cfg["latent_dim"], cfg["vq"], cfg["code_dim"], cfg["num_codebooks"],
               cfg["codebook_size"], cfg["vq_decay"], cfg.get("vq_restart", 0.0), bool(cfg.get("idm_diff", 0)))


def build_fdm(cfg):
    return FDM(cfg["latent_dim"], cfg["fdm_width"], residual=bool(cfg.get("fdm_residual", 0)))


def build_stage1(args, train_data, test_data, device):
    """Stage 1's models, optimizer, LR schedule, train step and evaluation: what train_loop runs (and bench times).
    -> (modules, opt, lr_fn, train_step, evaluate)"""
    args.game = train_data.game
    amp = use_amp(args, device)
    seed_everything(args.seed)
    idm = build_idm(vars(args)).to(device, memory_format=torch.channels_last)
    fdm = build_fdm(vars(args)).to(device, memory_format=torch.channels_last)
    params = list(idm.parameters()) + list(fdm.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, fused=device.type == "cuda")
    if device.type == "cuda":
        train_data.to(device)
    print(f"stage1: {len(train_data)} train frames ({len(train_data.centres)} windows), {len(test_data)} test frames | "
          f"IDM {sum(p.numel() for p in idm.parameters()) / 1e6:.2f}M FDM {sum(p.numel() for p in fdm.parameters()) / 1e6:.2f}M "
          f"params | device {device} amp {amp}", flush=True)
    g = torch.Generator().manual_seed(12345)  # fixed evaluation windows
    eval_c = test_data.sample(args.eval_windows, g)
    probe_c = test_data.sample(args.probe_windows, g) if test_data.ta is not None else None

    def train_step(gen):
        # ALGO LOGIC: the FDM must predict o_{t+1} from the past frames and z_q; z_q is the only path for
        # information about the future, and the VQ bottleneck keeps it small: it learns "what changed" = the action.
        w = train_data.windows(train_data.sample(args.batch_size, gen), device)
        with autocast(device, amp):
            out = idm(w)
            pred = fdm(w[:, :2], out["zq"])
        fdm_loss = F.mse_loss(pred.float(), preprocess(w[:, 2]))
        loss = fdm_loss + args.commit_weight * out["commit"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        return {"fdm_loss": fdm_loss.detach(), "commit": out["commit"].detach(),
                "perplexity": out["perplexity"].detach(), "grad_norm": gn}

    @torch.no_grad()
    def evaluate():
        idm.eval(), fdm.eval()
        losses = []
        for i in range(0, len(eval_c), 256):
            w = test_data.windows(eval_c[i:i + 256], device)
            with autocast(device, amp):
                pred = fdm(w[:, :2], idm(w)["zq"])
            losses.append(F.mse_loss(pred.float(), preprocess(w[:, 2]), reduction="sum") / pred[0].numel())
        m = {"test_fdm_loss": (sum(losses) / len(eval_c)).item()}
        if probe_c is not None:
            m["probe_acc"], m["probe_majority"] = probe_accuracy(
                idm_latents(idm, test_data, probe_c, device, amp), test_data.labels(probe_c), args.seed)
        return m

    return {"idm": idm, "fdm": fdm}, opt, make_lr_fn(args.stage1_steps, 50, 0.1, 0.01), train_step, evaluate


def stage1(args, train=None, test=None):
    """Train the latent IDM and the FDM jointly on action-free video. -> (idm, fdm, summary)."""
    device, train_data = get_device(args), train or load_split(args.data, "train", args.max_chunks)
    test_data = test or load_split(args.data, "test", args.max_chunks)
    modules, opt, lr_fn, train_step, evaluate = build_stage1(args, train_data, test_data, device)
    summary = train_loop("stage1", args, modules, opt, lr_fn, train_step, evaluate, args.stage1_steps)
    write_summary(args.out, "stage1", summary)
    return modules["idm"].eval(), modules["fdm"].eval(), summary


def load_stage1(out, device, data_game=None):
    path = os.path.join(out, "stage1.pt")
    if not os.path.exists(path):
        raise LapoError(f"no stage-1 checkpoint {path}; run `python lapo.py stage1 --out {out} ...` first")
    ck = load_checkpoint(path, ("stage1",))
    if data_game and ck["config"].get("game") and ck["config"]["game"] != data_game:
        raise LapoError(f"{path} was trained on {ck['config']['game']}, but the data is {data_game}")
    idm = build_idm(ck["config"])
    idm.load_state_dict(ck["idm"])
    return idm.to(device, memory_format=torch.channels_last).eval().requires_grad_(False), ck


# ==============================================================================================
# STAGE 2: latent behaviour cloning pi(o_t) -> z_t on IDM-labeled frames
# ==============================================================================================
def build_stage2(args, train_data, test_data, device):
    """Stage 2's policy, optimizer, LR schedule, train step and evaluation, on the frozen IDM of <out>/stage1.pt.
    -> (modules, opt, lr_fn, train_step, evaluate)"""
    idm, ck1 = load_stage1(args.out, device, train_data.game)
    args.game, args.stage1_config = train_data.game, {k: ck1["config"][k] for k in ("latent_dim", "vq", "impala_scale")}
    amp = use_amp(args, device)
    seed_everything(args.seed)
    policy = ImpalaCNN(3, ck1["config"]["latent_dim"], args.impala_scale).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, fused=device.type == "cuda")
    if device.type == "cuda":
        train_data.to(device)
    eval_c = test_data.sample(args.eval_windows, torch.Generator().manual_seed(12345))
    eval_z = idm_latents(idm, test_data, eval_c, device, amp)

    def train_step(gen):
        # ALGO LOGIC: regress the IDM's *continuous, pre-quantization* latent of the window centred on o_t from
        # o_t alone. It is richer than the code index and its MSE is smooth; the IDM is frozen (eval mode).
        c = train_data.sample(args.batch_size, gen)
        w = train_data.windows(c, device)
        with torch.no_grad(), autocast(device, amp):
            target = idm(w)["z"].float()
        with autocast(device, amp):
            pred = policy(preprocess(w[:, 1]))
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        opt.step()
        return {"loss": loss.detach(), "grad_norm": gn}

    @torch.no_grad()
    def evaluate():
        policy.eval()
        preds = []
        for i in range(0, len(eval_c), 256):
            with autocast(device, amp):
                preds.append(policy(preprocess(test_data.windows(eval_c[i:i + 256], device)[:, 1])).float().cpu())
        pred = torch.cat(preds)
        return {"test_loss": F.mse_loss(pred, eval_z).item(),
                "test_loss_mean_baseline": F.mse_loss(eval_z.mean(0).expand_as(eval_z), eval_z).item()}

    return {"policy": policy}, opt, make_lr_fn(args.stage2_steps, args.warmup2, 0.01, 0.0), train_step, evaluate


def stage2(args, train=None, test=None):
    """Behaviour-clone the latent policy on the frozen IDM's latents. -> (policy, summary)."""
    device, train_data = get_device(args), train or load_split(args.data, "train", args.max_chunks)
    test_data = test or load_split(args.data, "test", args.max_chunks)
    modules, opt, lr_fn, train_step, evaluate = build_stage2(args, train_data, test_data, device)
    summary = train_loop("stage2", args, modules, opt, lr_fn, train_step, evaluate, args.stage2_steps)
    write_summary(args.out, "stage2", summary)
    return modules["policy"].eval(), summary


def load_stage2(out, device):
    path = os.path.join(out, "stage2.pt")
    if not os.path.exists(path):
        raise LapoError(f"no stage-2 checkpoint {path}; run `python lapo.py stage2 --out {out} ...` first")
    ck = load_checkpoint(path, ("stage2",))
    policy = ImpalaCNN(3, ck["config"]["stage1_config"]["latent_dim"], ck["config"]["impala_scale"])
    policy.load_state_dict(ck["policy"])
    return policy.to(device).eval().requires_grad_(False), ck


# ==============================================================================================
# STAGE 3 (offline): decode latent actions with a small action-labeled set
# ==============================================================================================
def train_classifier(model, inputs, labels, steps, batch, lr, seed, smoothing=0.05, device="cpu"):
    """Cross-entropy training on an in-memory labeled set (decoder on latents, or BC on uint8 frames)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(labels), (min(batch, len(labels)),), generator=gen)
        out = model(inputs[idx].to(device))
        logits = out[0] if isinstance(out, tuple) else out
        loss = F.cross_entropy(logits.float(), labels[idx].to(device), label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, inputs, labels, device, batch=512):
    hits = 0
    for i in range(0, len(labels), batch):
        out = model(inputs[i:i + batch].to(device))
        hits += ((out[0] if isinstance(out, tuple) else out).argmax(-1).cpu() == labels[i:i + batch]).sum().item()
    return hits / len(labels)


@torch.no_grad()
def policy_latents(policy, frames, device, amp, batch=256):
    out = []
    for i in range(0, len(frames), batch):
        with autocast(device, amp):
            out.append(policy(preprocess(frames[i:i + batch].to(device))).float().cpu())
    return torch.cat(out)


def stage3_offline(args):
    """Train only the decoder on N labeled frames per --labels value; evaluate in the env. -> summary."""
    device = get_device(args)
    amp = use_amp(args, device)
    train_data, test_data = load_split(args.data, "train", args.max_chunks), load_split(args.data, "test")
    for d in (train_data, test_data):
        if d.ta is None:
            raise LapoError(f"{d.name} has no action labels 'ta'; offline decoding needs a labeled set")
    idm, ck1 = load_stage1(args.out, device, train_data.game)
    policy, ck2 = load_stage2(args.out, device)
    game = ck1["config"].get("game") or args.env
    labels = sorted({int(x) for x in str(args.labels).split(",")})
    if max(labels) > len(train_data.centres):
        raise LapoError(f"--labels {max(labels)} asks for more labeled frames than the {len(train_data.centres)} "
                        f"in {train_data.name}")
    # fixed held-out labeled frames from the test split: decoder accuracy on what the agent would see
    test_c = test_data.sample(min(2048, len(test_data.centres)), torch.Generator().manual_seed(1))
    test_frames, test_y = test_data.obs[test_c.cpu()], test_data.labels(test_c)
    test_pi = policy_latents(policy, test_frames, device, amp)
    perm = torch.randperm(len(train_data.centres), generator=torch.Generator().manual_seed(args.seed))
    arch = {"scale": ck2["config"]["impala_scale"], "latent_dim": ck1["config"]["latent_dim"]}
    results = []
    for n in labels:
        c = train_data.centres[perm[:n].to(train_data.centres.device)]
        y = train_data.labels(c)
        # ALGO LOGIC: the decoder maps latent actions to real ones. Its inputs are the latent policy's outputs on o_t
        # (what it decodes when acting), or the IDM's latents of the labeled transitions (cleaner, but pi(o_t) is their
        # conditional mean given o_t alone, a shifted input; measured on starpilot at 64 labels: return 3.25 vs 2.06).
        z = idm_latents(idm, train_data, c, device, amp) if args.decoder_input == "idm" else \
            policy_latents(policy, train_data.obs[c.cpu()], device, amp)
        agent = DecodedAgent(**arch)
        agent.policy.load_state_dict(policy.state_dict())
        train_classifier(agent.decoder.fit_input(z), z, y, args.decoder_steps, 512, 1e-3, args.seed + n)
        agent = agent.to(device).eval()
        row = {"method": "lapo", "labels": n, "test_acc": accuracy(agent.decoder, test_pi, test_y, device)}
        path = os.path.join(args.out, f"decoded_{n}.pt")
        save_policy(path, agent, game, arch, labels=n)
        row.update(evaluate_agent(agent, game, args, path))
        results.append(row)
        if args.baseline == "bc":  # BC from scratch: same network, same N frames, true actions
            torch.manual_seed(args.seed + n)
            bc = ImpalaAgent(arch["scale"]).to(device)
            train_classifier(bc, train_data.obs[c.cpu()], y, args.bc_steps, 64, 5e-4, args.seed + n, device=device)
            row = {"method": "bc", "labels": n, "test_acc": accuracy(bc, test_frames, test_y, device)}
            path = os.path.join(args.out, f"bc_{n}.pt")
            save_policy(path, bc, game, {"scale": arch["scale"]}, labels=n)
            row.update(evaluate_agent(bc, game, args, path))
            results.append(row)
    summary = {"stage": "stage3_offline", "game": game, "decoder_input": args.decoder_input, "results": results}
    write_summary(args.out, "stage3_offline", summary)
    return summary


# ==============================================================================================
# PPO: one implementation for the expert, PPO from scratch, and online decoding (stage 3 online)
# ==============================================================================================
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

    def state_dict(self):
        return {"ret": self.ret, "count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, s):
        self.ret, self.count, self.mean, self.var = s["ret"], s["count"], s["mean"], s["var"]


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


def ppo(args, agent, groups, stage, game, on_update=None, extra_state=None):
    """Train `agent` with PPO. groups: list of (name, params, lr_fn(frames)); on_update(ctx) runs after each
    update (online decoding retrains its decoder there). Returns the learning curve (list of dicts)."""
    device = get_device(args)
    amp, logger = use_amp(args, device), Logger(args.out)
    E, T = args.num_envs, args.num_steps
    frames_per_update = E * T
    n_updates = max(1, args.frames // frames_per_update)
    opt = torch.optim.Adam([{"params": p, "lr": 0.0, "name": n} for n, p, _ in groups], eps=1e-5)
    params = [p for _, ps, _ in groups for p in ps]
    envs, norm = Envs(game, E, args.seed), RewardNormalizer(E, args.gamma)
    ckpt, start, curve = os.path.join(args.out, f"{stage}_state.pt"), 0, []
    if os.path.exists(ckpt):
        if not args.resume:
            raise LapoError(f"{ckpt} already exists; pass --resume to continue that run, or choose another --out")
        ck = load_checkpoint(ckpt, ("ppo",))
        check_same_config(ck["config"], config_of(args), ckpt)
        agent.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        norm.load_state_dict(ck["norm"])
        start, curve = ck["update"], ck["curve"]
        if extra_state is not None:
            extra_state["load"](ck["extra"])
        print(f"{stage}: resumed at update {start} (environments restart fresh)", flush=True)
    agent.to(device)
    obs_buf = torch.zeros((T + 1, E, 64, 64, 3), dtype=torch.uint8, device=device)
    act_buf, logp_buf, val_buf, rew_buf, done_buf = (torch.zeros((T, E), device=device) for _ in range(5))
    obs = torch.from_numpy(envs.reset()).to(device)
    prev = {"obs": obs.clone(), "done": torch.ones(E, dtype=torch.bool, device=device)}  # frame before the rollout
    t0, returns = time.time(), []
    for update in range(start, n_updates):
        frames = update * frames_per_update
        for g, (_, _, lr_fn) in zip(opt.param_groups, groups):
            g["lr"] = lr_fn(frames)
        t_roll, finished, enc_buf = time.time(), [], []
        agent.eval()
        for t in range(T):  # ---- rollout
            obs_buf[t] = obs
            with torch.no_grad(), autocast(device, amp):
                enc = agent.encode(obs_buf[t])  # frozen features (online decoding) or the stored frames themselves
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
        mb = T * E // args.num_minibatches
        stats = []
        for _ in range(args.update_epochs):
            perm = torch.randperm(T * E, device=device)
            for i in range(0, T * E, mb):
                idx = perm[i:i + mb]
                with autocast(device, amp):
                    logits, value = agent.heads(b_enc[idx])
                dist = torch.distributions.Categorical(logits=logits.float())
                ratio = torch.exp(dist.log_prob(b_act[idx]) - b_logp[idx])
                a_mb = b_adv[idx]
                a_mb = (a_mb - a_mb.mean()) / (a_mb.std() + 1e-8)
                pg_loss = torch.max(-a_mb * ratio, -a_mb * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
                value = value.float()
                v_clip = b_val[idx] + (value - b_val[idx]).clamp(-args.clip_coef, args.clip_coef)
                v_loss = 0.5 * torch.max((value - b_ret[idx]) ** 2, (v_clip - b_ret[idx]) ** 2).mean()
                entropy = dist.entropy().mean()
                loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                opt.step()
                stats.append(torch.stack([pg_loss.detach(), v_loss.detach(), entropy.detach()]))
        frames = (update + 1) * frames_per_update
        info = {}
        if on_update is not None:
            info = on_update({"update": update, "frames": frames, "obs": obs_buf, "actions": act_buf.long(),
                              "dones": done_buf.bool(), "prev": prev}) or {}
        prev = {"obs": obs_buf[T - 1].clone(), "done": done_buf[T - 1].bool()}  # o_{T-1}: the next rollout's o_{-1}
        returns += [r for _, r, _ in finished]
        pg, vl, ent = torch.stack(stats).mean(0).tolist()
        mean_ret = float(np.mean([r for _, r, _ in finished])) if finished else None
        point = {"update": update + 1, "frames": frames, "mean_return": mean_ret, "episodes": len(finished),
                 "normalized_return": normalized_return(game, mean_ret, args.expert_return) if finished else None,
                 "episode_returns": [r for _, r, _ in finished], "pg_loss": pg, "v_loss": vl, "entropy": ent, **info}
        el = time.time() - t0
        point["fps"] = (frames - start * frames_per_update) / el  # env frames/s including updates
        curve.append({k: v for k, v in point.items() if k != "episode_returns"})
        logger.log(stage, point, f"{stage} update {update + 1}/{n_updates} frames {frames} | return "
                   f"{'n/a' if mean_ret is None else f'{mean_ret:.2f}'} ({len(finished)} eps) | pg {pg:.3f} v {vl:.3f} "
                   f"ent {ent:.3f}" + (f" | decoder acc {info['decoder_train_acc']:.3f} on {info['decoder_pairs']} pairs"
                                       if "decoder_pairs" in info else "") + f" | {point['fps']:.1f} frames/s (rollout {t_roll:.1f}s) | "
                   f"eta {fmt_time(el / (update + 1 - start) * (n_updates - update - 1))}")
        if (update + 1) % args.ckpt_every_updates == 0 or update + 1 == n_updates:
            save_atomic({"kind": "ppo", "config": config_of(args), "update": update + 1, "model": agent.state_dict(),
                         "opt": opt.state_dict(), "norm": norm.state_dict(), "curve": curve,
                         "extra": extra_state["save"]() if extra_state else None}, ckpt)
    envs.close()
    return curve


def ramp(start, end, peak, total):
    """LR that is 0 until `start` frames, rises linearly to `peak` at `end`, then anneals to 0 at `total`."""
    def fn(frames):
        if frames < start:
            return 0.0
        up = peak * min(1.0, (frames - start) / max(1, end - start))
        return up * max(0.0, 1 - frames / total)
    return fn


def expert(args):
    """Train a policy from scratch on the true actions (data-collection expert, or the PPO-from-scratch baseline)."""
    check_game(args.env)
    seed_everything(args.seed)
    agent = ImpalaAgent(args.impala_scale)
    anneal = lambda f: args.lr * max(0.0, 1 - f / args.frames)  # noqa: E731
    curve = ppo(args, agent, [("all", list(agent.parameters()), anneal)], "expert", args.env)
    path = os.path.join(args.out, "expert.pt")
    save_policy(path, agent, args.env, {"scale": args.impala_scale}, curve=curve)
    summary = {"stage": "expert", "game": args.env, "frames": curve[-1]["frames"], "path": path,
               **evaluate_agent(agent, args.env, args, path)}
    write_summary(args.out, "expert", summary)
    return agent, summary


def decoder_due(update, frames, s=1.0):
    """The paper's decoder schedule: after every update from 10k to 50k frames, then every 20th until 400k."""
    if 10_000 * s <= frames <= 50_000 * s:
        return True
    return 50_000 * s < frames <= 400_000 * s and update % 20 == 0


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
    policy, ck2 = load_stage2(args.out, device)
    game = ck1["config"].get("game") or args.env
    if game is None:
        raise LapoError("the stage-1 data folder is not named after a Procgen game; pass --env GAME")
    check_game(game)
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
        if not agent.sl:  # no SL: PPO trains the decoder (from the RL head's ramp on, so after this first update)
            if ctx["update"] == 0:
                agent.decoder.fit_input(policy_latents(policy, ctx["obs"].flatten(0, 1), device, amp))
            return {}
        # ALGO LOGIC (SL): label online transitions with the frozen IDM, retrain the decoder from scratch.
        if ctx["frames"] > 400_000 * s:
            return {}
        win, act = window_pairs(ctx["obs"], ctx["actions"], ctx["dones"], ctx["prev"])
        if len(act):
            store["z"].append(idm_latents(idm, FrameView(win), torch.arange(len(win)), device, amp))
            store["a"].append(act.cpu())
        if not decoder_due(ctx["update"], ctx["frames"], s) or not store["a"]:
            return {}
        z, a = torch.cat(store["z"]), torch.cat(store["a"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed + ctx["update"])
            dec = Decoder(arch["latent_dim"])
        train_classifier(dec.fit_input(z), z, a, math.ceil(3 * len(a) / 512), 512, 1e-3, args.seed + ctx["update"])
        agent.decoder.load_state_dict(dec.state_dict())
        return {"decoder_pairs": len(a), "decoder_train_acc": accuracy(dec, z[-4096:], a[-4096:], "cpu")}

    extra = {"save": lambda: {"z": store["z"], "a": store["a"]},
             "load": lambda e: store.update(e or {})}
    curve = ppo(args, agent, groups, "online" if agent.sl else "online_nosl", game, on_update, extra)
    path = os.path.join(args.out, "online.pt" if agent.sl else "online_nosl.pt")
    save_policy(path, agent, game, arch, curve=curve)
    summary = {"stage": "stage3_online", "game": game, "frames": curve[-1]["frames"], "sl": agent.sl, "path": path,
               **evaluate_agent(agent, game, args, path)}
    write_summary(args.out, "stage3_online" if agent.sl else "stage3_online_nosl", summary)
    return agent, curve


class FrameView:
    """Adapts a tensor of ready-made windows (n, 3, H, W, C) to the FrameData.windows interface."""

    def __init__(self, windows):
        self.w = windows

    def windows(self, idx, device):
        return self.w[idx.to(self.w.device)].to(device)


# ==============================================================================================
# EVALUATION
# ==============================================================================================
@torch.no_grad()
def evaluate_policy(agent, game, episodes, seed, device, amp=False, sample=True, max_steps=None, num_envs=64):
    """Run `episodes` full episodes (the first ones of each env, so short episodes are not over-counted).
    -> list of raw episode returns (and the number cut at max_steps)."""
    n = min(episodes, num_envs)
    quota = math.ceil(episodes / n)
    envs, agent = Envs(game, n, seed), agent.to(device).eval()
    obs, got, steps = envs.reset(), [[] for _ in range(n)], 0
    while any(len(g) < quota for g in got):
        a, _ = agent.act(torch.from_numpy(obs).to(device), sample=sample, amp=amp)
        obs, _, _, fin = envs.step(a)
        for e, r, _ in fin:
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
    device = get_device(args)
    t0 = time.time()
    rets = evaluate_policy(agent, game, args.eval_episodes, args.seed + 20_000, device, use_amp(args, device),
                           sample=not args.greedy, max_steps=args.eval_max_steps)
    mean = float(np.mean(rets))
    out = {"eval_mean_return": mean, "eval_std_return": float(np.std(rets)), "eval_episodes": len(rets),
           "eval_normalized_return": normalized_return(game, mean, args.expert_return), "eval_returns": rets,
           "eval_s": time.time() - t0}
    print(f"eval {path or ''} on {game}: return {mean:.2f} +- {out['eval_std_return']:.2f} over {len(rets)} episodes"
          + (f" | normalized {out['eval_normalized_return']:.3f}" if out["eval_normalized_return"] is not None else ""),
          flush=True)
    return out


def eval_cmd(args):
    device = get_device(args)
    agent, ck = load_policy(args.checkpoint, device)
    game = args.env or ck.get("game")
    check_game(game)
    summary = {"checkpoint": args.checkpoint, "game": game, **evaluate_agent(agent, game, args, args.checkpoint)}
    print(json.dumps(summary), flush=True)
    return summary


# ==============================================================================================
# PIPELINE: the whole method and its baselines in one command, then a results table and plots
# ==============================================================================================
def pipeline(args):
    """expert -> collect -> stage 1 -> stage 2 -> stage 3 offline (+ BC from scratch) -> stage 3 online
    (+ PPO from scratch; + the no-SL ablation with --ablations) -> results.md and plots.
    Every step runs its own subcommand (the exact command line is printed, so any step can be rerun alone)
    and is skipped when its summary exists: an interrupted pipeline continues where it stopped."""
    check_game(args.env)
    root, game = args.out, args.env
    data, run = os.path.join(root, "data", game), os.path.join(root, "lapo")
    flags = ["--preset", args.preset, "--seed", str(args.seed), "--device", args.device, "--amp", args.amp]
    os.makedirs(root, exist_ok=True)
    times_path = os.path.join(root, "pipeline_times.json")
    times = read_json(times_path) or {}

    def step(name, argv, done, ckpt=None):
        if os.path.exists(done):
            print(f"pipeline: {name} done ({done})", flush=True)
            return
        argv = [str(a) for a in argv] + flags + (["--resume"] if ckpt and os.path.exists(ckpt) else [])
        print(f"\npipeline: {name}: python lapo.py {' '.join(argv)}", flush=True)
        t0, sub = time.time(), parse_args(argv)
        sub.func(sub)
        times[name] = times.get(name, 0.0) + time.time() - t0
        write_json(times_path, times)

    expert_ckpt = args.expert or os.path.join(root, "expert", "expert.pt")
    if not args.expert:
        step("expert", ["expert", "--env", game, "--out", os.path.join(root, "expert")],
             os.path.join(root, "expert", "expert_summary.json"), os.path.join(root, "expert", "expert_state.pt"))
    if os.path.isdir(data) and not os.path.exists(os.path.join(data, "collect_summary.json")):
        print(f"pipeline: {data} holds an interrupted collection; recollecting", flush=True)
        shutil.rmtree(data)
    step("collect", ["collect", "--env", game, "--policy", expert_ckpt, "--out", os.path.join(root, "data")],
         os.path.join(data, "collect_summary.json"))
    # normalize against the expert whose data we learn from (the REFERENCE table's convention)
    expert_return = read_json(os.path.join(data, "collect_summary.json"))["train"]["mean_return"]
    norm = ["--expert-return", expert_return]
    step("stage1", ["stage1", "--data", data, "--out", run], os.path.join(run, "stage1_summary.json"),
         os.path.join(run, "stage1.pt"))
    step("stage2", ["stage2", "--data", data, "--out", run], os.path.join(run, "stage2_summary.json"),
         os.path.join(run, "stage2.pt"))
    step("stage3 offline + BC from scratch", ["stage3", "--mode", "offline", "--baseline", "bc", "--data", data,
                                              "--out", run, *norm], os.path.join(run, "stage3_offline_summary.json"))
    step("stage3 online (RL+SL)", ["stage3", "--mode", "online", "--out", run, *norm],
         os.path.join(run, "stage3_online_summary.json"), os.path.join(run, "online_state.pt"))
    frames = parse_args(["stage3", "--mode", "online", "--preset", args.preset]).frames  # the same budget
    scratch = os.path.join(root, "ppo_scratch")
    step("PPO from scratch", ["expert", "--env", game, "--frames", frames, "--out", scratch, *norm],
         os.path.join(scratch, "expert_summary.json"), os.path.join(scratch, "expert_state.pt"))
    if args.ablations:
        step("stage3 online, no SL", ["stage3", "--mode", "online", "--no-sl", "--out", run, *norm],
             os.path.join(run, "stage3_online_nosl_summary.json"), os.path.join(run, "online_nosl_state.pt"))
    report(root, game, args)


def report(root, game, args):
    """Write <root>/results.md and the plots from the summaries and checkpoints the pipeline left."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run, data = os.path.join(root, "lapo"), os.path.join(root, "data", game)
    j = {n: read_json(os.path.join(run, f"{n}_summary.json"))
         for n in ("stage1", "stage2", "stage3_offline", "stage3_online", "stage3_online_nosl")}
    collected = read_json(os.path.join(data, "collect_summary.json"))
    scratch = read_json(os.path.join(root, "ppo_scratch", "expert_summary.json"))
    times = read_json(os.path.join(root, "pipeline_times.json")) or {}
    ex, rnd = collected["train"]["mean_return"], SCORES[game][0]
    ok = ex > rnd  # normalizing needs an expert better than random

    def fmt(s):
        r = s["eval_mean_return"]
        return f"{r:.2f} ± {s['eval_std_return']:.2f} | " + (f"{normalized_return(game, r, ex):.3f}" if ok else "n/a")

    lines = [f"# LAPO pipeline results: {game}, preset `{args.preset}`, seed {args.seed}", "",
             f"Normalized return = (R - {rnd}) / ({ex:.2f} - {rnd}): random from the REFERENCE table, expert = mean "
             "return of the expert's episodes in the collected data." if ok else
             f"**The expert ({ex:.2f}) is no better than random ({rnd}) at this budget**: normalized returns are "
             "undefined, and the comparisons below say nothing about LAPO. Give the expert more frames "
             "(`--expert PATH`, or the `expert.frames` of a larger preset).", "",
             "| policy | trained on | mean return ± std | normalized |", "|---|---|---|---|",
             f"| random | (REFERENCE table) | {rnd:.2f} | {'0.000' if ok else 'n/a'} |",
             f"| expert (PPO) | {collected['train']['episodes']} episodes of collected data | {ex:.2f} | "
             f"{'1.000' if ok else 'n/a'} |"]
    off = j["stage3_offline"]["results"] if j["stage3_offline"] else []
    for r in off:
        what = "LAPO offline decoder" if r["method"] == "lapo" else "BC from scratch"
        lines.append(f"| {what} | {r['labels']} labeled frames (action accuracy on test frames {r['test_acc']:.3f}) | {fmt(r)} |")
    for name, s in (("LAPO online (RL+SL)", j["stage3_online"]), ("LAPO online, no SL", j["stage3_online_nosl"]),
                    ("PPO from scratch", scratch)):
        if s:
            lines.append(f"| {name} | {s['frames']:,} env frames | {fmt(s)} |")
    s1, s2 = j["stage1"], j["stage2"]
    lines += ["", f"Stage 1: held-out probe accuracy {s1.get('probe_acc', float('nan')):.3f} (majority class "
              f"{s1.get('probe_majority', float('nan')):.3f}), test FDM loss {s1['test_fdm_loss']:.5f}, "
              f"{s1['samples_per_s']:.0f} samples/s. Stage 2: test loss {s2['test_loss']:.4f}, "
              f"{s2['samples_per_s']:.0f} samples/s.", "", "| step | wall time |", "|---|---|"]
    lines += [f"| {k} | {fmt_time(v)} |" for k, v in times.items()]
    lines += [f"| total | {fmt_time(sum(times.values()))} |", ""]

    def levels(ax):
        ax.axhline(ex, ls="--", c="gray", lw=1, label="expert")
        ax.axhline(rnd, ls=":", c="gray", lw=1, label="random")

    plots = []
    if off:  # return vs number of labels (the paper's offline figure)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method, label in (("lapo", "LAPO (decoder on latent policy)"), ("bc", "BC from scratch")):
            rs = [r for r in off if r["method"] == method]
            ax.plot([r["labels"] for r in rs], [r["eval_mean_return"] for r in rs], "o-", label=label)
        levels(ax)
        ax.set(xscale="log", xlabel="labeled frames", ylabel="mean return", title=f"offline decoding, {game}")
        ax.legend()
        plots.append(("offline.png", fig))
    curves = [(n, os.path.join(p, f)) for n, p, f in (("LAPO online (RL+SL)", run, "online.pt"),
                                                       ("LAPO online, no SL", run, "online_nosl.pt"),
                                                       ("PPO from scratch", os.path.join(root, "ppo_scratch"), "expert.pt"))]
    curves = [(n, load_checkpoint(p, ("policy",))["curve"]) for n, p in curves if os.path.exists(p)]
    if curves:  # online learning curves (the paper's online figure)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, curve in curves:
            pts = [(c["frames"], c["mean_return"]) for c in curve if c["mean_return"] is not None]
            if pts:
                f, r = np.array(pts).T
                k = max(1, len(r) // 20)  # moving average over ~5% of the updates
                ax.plot(f[k - 1:], np.convolve(r, np.ones(k) / k, "valid"), label=name)
        levels(ax)
        ax.set(xlabel="env frames", ylabel="mean return", title=f"online, {game}")
        ax.legend()
        plots.append(("online.png", fig))
    cpu = torch.device("cpu")
    idm, ck = load_stage1(run, cpu)
    test = load_split(data, "test")
    if test.ta is not None:  # 2-D PCA of the IDM's continuous latents, coloured by the true action
        c = test.sample(min(2048, len(test.centres)), torch.Generator().manual_seed(0))
        z, y = idm_latents(idm, test, c, cpu, False), test.labels(c).numpy()
        z = z - z.mean(0)
        xy = (z @ torch.linalg.svd(z, full_matrices=False)[2][:2].T).numpy()
        fig, ax = plt.subplots(figsize=(6, 4.5))
        cmap = plt.get_cmap("tab20")
        for a in np.unique(y):
            ax.scatter(*xy[y == a].T, s=4, color=cmap(a), label=ACTION_NAMES[a])
        ax.set(title=f"IDM latents (PCA), coloured by true action, {game}", xticks=[], yticks=[])
        ax.legend(markerscale=3, fontsize=6, ncol=2, loc="best")
        plots.append(("latents.png", fig))
    fdm = build_fdm(ck["config"])
    fdm.load_state_dict(ck["fdm"])
    fdm.eval()
    c = test.sample(512, torch.Generator().manual_seed(1))
    w = test.windows(c, cpu)
    change = (w[:, 2].float() - w[:, 1].float()).abs().mean((1, 2, 3))
    w = w[change.argsort(descending=True)[:6]]  # the 6 windows with the most motion
    with torch.no_grad():
        pred = ((fdm(w[:, :2], idm(w)["zq"]) + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1)
    rows = [("o_t", w[:, 1]), ("true o_t+1", w[:, 2]), ("FDM prediction", pred),
            ("|true - o_t| x4", ((w[:, 2].float() - w[:, 1].float()).abs() * 4).clamp(0, 255).byte()),
            ("|prediction - o_t| x4", ((pred.float() - w[:, 1].float()).abs() * 4).clamp(0, 255).byte())]
    fig, axes = plt.subplots(len(rows), len(w), figsize=(1.4 * len(w), 1.5 * len(rows)))
    for i, (name, imgs) in enumerate(rows):
        for k in range(len(w)):
            axes[i, k].imshow(imgs[k].numpy())
            axes[i, k].set(xticks=[], yticks=[])
        axes[i, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(f"FDM on held-out {game} frames", fontsize=9)
    plots.append(("fdm.png", fig))
    for name, fig in plots:
        fig.tight_layout()
        fig.savefig(os.path.join(root, name), dpi=110)
        plt.close(fig)
        lines.append(f"![{name}]({name})")
    with open(os.path.join(root, "results.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(root, "results.md.tmp"), os.path.join(root, "results.md"))  # atomic, like all outputs
    print("\n".join(ln for ln in lines if not ln.startswith("![")), flush=True)
    print(f"pipeline: wrote {os.path.join(root, 'results.md')} and {', '.join(n for n, _ in plots)}", flush=True)


# ==============================================================================================
# BENCHMARK: throughput of each stage on this machine, timed through the code the stages run
# ==============================================================================================
# The authors' release, paper configuration, on 2 CPU cores with torch 2.13 (shown with --preset paper only).
# Their probe evaluation took 538 s, as long as 87 train steps: 87 / (500 + 87) of stage 1 at eval_every 500.
BENCH_REFERENCE = {"stage1_samples_per_s": 21.0, "stage2_samples_per_s": 26.0, "online_frames_per_s": 11.3,
                   "probe_eval_s": 538.0, "probe_eval_steps": 87.0, "probe_eval_frac": 87 / (500 + 87),
                   "host_mem_x_frames": 6.8}


def timed(fn, times, device):
    """fn, but each call appends its wall time (until the device has finished) to `times`."""
    def wrapper(*a):
        t0 = time.perf_counter()
        out = fn(*a)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        return out
    return wrapper


def bench(args):
    """Collect bigfish frames into a temporary folder, then time the stages' own train steps (through train_loop),
    the stage-1 evaluation with its probe, window sampling, PPO updates (expert and online decoding) and peak
    memory. Prints one line per measurement, a table, and one JSON line. -> dict of measurements"""
    import resource  # Unix only
    import tempfile
    import tracemalloc
    steps = (5 if args.preset == "tiny" else 10) if args.steps is None else args.steps
    frames = min(PRESETS[args.preset]["frames"], 16384) if args.bench_frames is None else args.bench_frames
    if steps < 1 or args.warmup < 0 or args.ppo_updates < 1 or frames < 256:
        raise LapoError("bench needs --steps >= 1, --warmup >= 0, --ppo-updates >= 1 and --frames >= 256")
    device, total, res, rows = get_device(args), args.warmup + steps, {}, []

    def args_of(*argv):  # another command's flags, with this preset, seed, device and amp
        shared = ("--preset", args.preset, "--seed", args.seed, "--device", args.device, "--amp", args.amp)
        return parse_args([str(x) for x in (*argv, *shared)])

    def num(v):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:#.3g}"

    def record(key, value, unit, what):
        res[key], ref = value, BENCH_REFERENCE.get(key) if args.preset == "paper" else None
        rows.append((what, value, unit, ref))
        print(f"bench: {what}: {num(value)} {unit}" + (f" (reference {num(ref)})" if ref else ""), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        run, a = os.path.join(tmp, "run"), args_of("collect", "--env", "bigfish", "--out", os.path.join(tmp, "data"),
                                                   "--frames", frames, "--test-frames", frames // 4)
        data = collect(a)
        tracemalloc.start()  # counts every allocation of Python and NumPy while the loader runs
        train, test = load_split(data, "train"), load_split(data, "test")
        load_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        raw = train.obs.nbytes + test.obs.nbytes  # the uint8 frames as stored
        record("data_mem_x_frames", load_peak / raw, "x frame bytes", f"loader's peak memory, {raw / 2 ** 20:.0f} MiB of frames")
        splits = a.collected.values()  # collect's own rate: env steps and writing chunks, not starting the envs
        rate = sum(c["frames"] for c in splits) / sum(c["frames"] / c["frames_per_s"] for c in splits)
        record("collect_frames_per_s", rate, "frames/s", f"collect, random policy, {a.num_envs} envs")
        for stage, build in (("stage1", build_stage1), ("stage2", build_stage2)):
            a = args_of(stage, "--data", data, "--out", run)
            every = a.eval_every
            setattr(a, f"{stage}_steps", total)
            a.eval_every = a.ckpt_every = a.log_every = total  # one evaluation and one checkpoint, at the end
            modules, opt, lr_fn, train_step, evaluate = build(a, train, test, device)
            step_t, eval_t = [], []
            train_step, evaluate = timed(train_step, step_t, device), timed(evaluate, eval_t, device)
            train_loop(stage, a, modules, opt, lr_fn, train_step, evaluate, total)  # the stage's own loop and step
            step_s = float(np.median(step_t[args.warmup:]))
            record(f"{stage}_samples_per_s", a.batch_size / step_s, "samples/s",
                   f"{stage} train step, batch {a.batch_size}")
            if stage == "stage1":
                record("probe_eval_s", eval_t[0], "s", f"stage1 eval (test loss + probe on {a.probe_windows})")
                record("probe_eval_steps", eval_t[0] / step_s, "train steps", "stage1 eval, as train steps")
                record("probe_eval_frac", eval_t[0] / (every * step_s + eval_t[0]), "of wall time",
                       f"stage1 eval share at eval_every {every}")
        gen, sample_t = torch.Generator().manual_seed(args.seed), []
        sample = timed(lambda: train.windows(train.sample(a.batch_size, gen), device), sample_t, device)
        for _ in range(args.warmup + 100):
            sample()
        record("windows_per_s", a.batch_size / np.median(sample_t[args.warmup:]), "windows/s",
               f"window sampling, batch {a.batch_size}")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        res["host_peak_mib"], res["frames_mib"] = rss / 2 ** 20, raw / 2 ** 20
        record("host_mem_x_frames", rss / raw, "x frame bytes", f"peak host memory, {raw / 2 ** 20:.0f} MiB of frames")
        if device.type == "cuda":
            record("cuda_mem_x_frames", torch.cuda.max_memory_allocated() / raw, "x frame bytes", "peak CUDA memory")
        ppo_runs = () if args.no_ppo else (("expert", ("expert", "--env", "bigfish", "--out", os.path.join(tmp, "expert"))),
                                           ("online", ("stage3", "--mode", "online", "--out", run)))  # RL+SL policy
        for stage, argv in ppo_runs:
            a = args_of(*argv, "--eval-episodes", 1, "--eval-max-steps", 1)  # final evaluation: one env step
            a.frames = (1 + args.ppo_updates) * a.num_envs * a.num_steps  # one warm-up update, then the timed ones
            (expert if stage == "expert" else stage3_online)(a)
            curve = load_checkpoint(os.path.join(a.out, f"{stage}.pt"), ("policy",))["curve"]
            update_s = np.diff([c["frames"] / c["fps"] for c in curve])  # fps counts from the start of PPO
            record(f"{stage}_frames_per_s", a.num_envs * a.num_steps / np.median(update_s), "env frames/s",
                   f"PPO {stage}, {a.num_envs} envs x {a.num_steps} steps")
    print(f"\n{'measure':<46} {'value':>8}  {'unit':<14} {'reference':>9} {'ratio':>6}")
    for what, v, unit, ref in rows:
        print((f"{what:<46} {num(v):>8}  {unit:<14}" + (f" {num(ref):>9} {v / ref:>6.2f}" if ref else "")).rstrip())
    out = {"bench": {"preset": args.preset, "device": str(device), "amp": use_amp(args, device),
                     "threads": torch.get_num_threads(), "steps": steps, "warmup": args.warmup,
                     "ppo_updates": args.ppo_updates, "frames": len(train) + len(test), **res,
                     **({"reference": BENCH_REFERENCE} if args.preset == "paper" else {})}}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_summary(args.out, "bench", out)  # bench_summary.json, and the JSON line
    else:
        print(json.dumps(out), flush=True)
    return out["bench"]


# ==============================================================================================
# COMMAND LINE
# ==============================================================================================
class Parser(argparse.ArgumentParser):
    """argparse whose errors (an unknown preset, a missing flag) are LapoErrors: one line, like every user error."""

    def error(self, message):
        raise LapoError(f"{self.prog}: {message} (see --help)")


def build_parser():
    p = Parser(description="LAPO: Learning to Act without Actions (single-file reference)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, out_default, resume=True):
        sp.add_argument("--preset", choices=PRESETS, default="paper",
                        help="paper: the paper's settings (GPU); small: minutes on a CPU; tiny: seconds (tests)")
        sp.add_argument("--seed", type=int, default=0, help="seed of everything; same seed on CPU, same result")
        sp.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
        sp.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                        help="bf16 autocast; auto: on for CUDA and for CPUs with bf16 units")
        sp.add_argument("--out", default=out_default, help="run folder (checkpoints, metrics.jsonl, summaries)")
        if resume:
            sp.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")

    def evaluation(sp):
        sp.add_argument("--eval-episodes", "--episodes", type=int, default=None,
                        help="episodes per evaluation (paper preset: 64)")
        sp.add_argument("--eval-max-steps", type=int, default=None, help="cut evaluation after this many env steps")
        sp.add_argument("--greedy", action="store_true", help="act with argmax instead of sampling")
        sp.add_argument("--expert-return", type=float, default=None,
                        help="normalize against this expert return (self-collected data) instead of the paper's")

    def training(sp, steps_key, lr, steps_help):
        sp.add_argument("--data", required=True, help="a game folder of the layout <root>/<game>/{train,test}/<i>.npz")
        sp.add_argument("--max-chunks", type=int, default=None, help="load at most this many train chunks")
        sp.add_argument(f"--{steps_key.replace('_', '-')}", type=int, default=None, help=steps_help)
        sp.add_argument("--batch-size", type=int, default=None, help="batch (paper: 128)")
        sp.add_argument("--lr", type=float, default=None, help=f"AdamW peak learning rate (paper: {lr})")
        sp.add_argument("--max-grad-norm", type=float, default=2.0, help="gradient norm clip")
        sp.add_argument("--impala-scale", type=float, default=None, help="IMPALA CNN width multiplier (paper: 4)")
        sp.add_argument("--eval-every", type=int, default=None, help="steps between test loss/probe evals (paper: 500)")
        sp.add_argument("--eval-windows", type=int, default=None, help="test windows for the test loss")
        sp.add_argument("--ckpt-every", type=int, default=None, help="steps between atomic checkpoints")
        sp.add_argument("--log-every", type=int, default=50, help="steps between progress lines")

    def ppo_flags(sp, frames_help):
        sp.add_argument("--frames", type=int, default=None, help=frames_help)
        sp.add_argument("--num-envs", type=int, default=None, help="parallel envs (paper: 64)")
        sp.add_argument("--num-steps", type=int, default=None, help="steps per env per rollout")
        sp.add_argument("--lr", type=float, default=None, help="Adam learning rate")
        sp.add_argument("--ent-coef", type=float, default=None, help="entropy bonus")
        sp.add_argument("--num-minibatches", type=int, default=8, help="minibatches per epoch of a PPO update")
        sp.add_argument("--update-epochs", type=int, default=3, help="epochs over each rollout")
        sp.add_argument("--gamma", type=float, default=0.999, help="discount (Procgen episodes are long)")
        sp.add_argument("--gae-lambda", type=float, default=0.95, help="GAE lambda")
        sp.add_argument("--clip-coef", type=float, default=0.2, help="policy and value clip range")
        sp.add_argument("--vf-coef", type=float, default=0.5, help="value loss weight")
        sp.add_argument("--max-grad-norm", type=float, default=0.5, help="gradient norm clip")
        sp.add_argument("--ckpt-every-updates", type=int, default=10, help="updates between atomic checkpoints")

    sp = sub.add_parser("collect", help="record Procgen rollouts in the authors' layout")
    common(sp, "data")
    sp.add_argument("--env", required=True, help=f"Procgen game: {', '.join(GAMES)}")
    sp.add_argument("--policy", default="random", help="'random' or a policy checkpoint saved by this script")
    sp.add_argument("--frames", type=int, default=None, help="train frames (paper preset: 2,621,440 = 80 chunks)")
    sp.add_argument("--test-frames", type=int, default=None, help="test-split frames")
    sp.add_argument("--num-envs", type=int, default=None, help="parallel envs (paper: 64); a chunk holds one segment per env")
    sp.add_argument("--chunk-len", type=int, default=32768, help="frames per train chunk (authors: 32,768)")
    sp.add_argument("--test-chunk-len", type=int, default=4096, help="frames per test chunk (authors: 4,096)")
    sp.set_defaults(func=collect)

    sp = sub.add_parser("stage1", help="train the latent IDM + FDM (no actions used)")
    common(sp, "runs/lapo")
    training(sp, "stage1_steps", 3e-4, "training steps (paper: 50,000)")
    sp.add_argument("--latent-dim", type=int, default=128, help="IDM latent size")
    sp.add_argument("--code-dim", type=int, default=16, help="dims per quantized vector (128/16 = 8 vectors)")
    sp.add_argument("--num-codebooks", type=int, default=2, help="codebooks, each for an equal share of vectors")
    sp.add_argument("--codebook-size", type=int, default=64, help="codes per codebook")
    sp.add_argument("--vq-decay", type=float, default=None, help="EMA decay of the codebooks (paper: 0.999)")
    sp.add_argument("--vq-restart", type=float, default=None,
                    help="re-seed codes whose EMA usage count falls below this (0: off, as in the paper)")
    sp.add_argument("--commit-weight", type=float, default=0.05, help="commitment loss weight")
    sp.add_argument("--no-vq", dest="vq", action="store_false", help="ablation: no VQ bottleneck")
    sp.add_argument("--fdm-width", type=int, default=None, help="U-Net base width (paper: 24)")
    sp.add_argument("--idm-diff", type=int, choices=(0, 1), default=None,
                    help="1: the IDM sees (o_t, frame differences) instead of the 3 frames (paper: 0)")
    sp.add_argument("--fdm-residual", type=int, choices=(0, 1), default=None,
                    help="1: the FDM predicts o_t + change, starting as a copy (paper: 0, predicts o_{t+1} directly)")
    sp.add_argument("--probe-windows", type=int, default=None, help="labeled test windows for the probe (half train)")
    sp.set_defaults(func=lambda a: stage1(a))

    sp = sub.add_parser("stage2", help="behaviour-clone the latent policy on IDM latents")
    common(sp, "runs/lapo")
    training(sp, "stage2_steps", 2e-4, "training steps (paper: 60,000)")
    sp.add_argument("--warmup2", type=int, default=1000, help="LR warm-up steps (0.01x -> 1x)")
    sp.set_defaults(func=lambda a: stage2(a))

    sp = sub.add_parser("stage3", help="decode latent actions: offline (labeled frames) or online (PPO)")
    common(sp, "runs/lapo")
    evaluation(sp)
    sp.add_argument("--mode", choices=("offline", "online"), required=True,
                    help="offline: decoder from a few labeled frames; online: PPO in the env (RL+SL)")
    sp.add_argument("--env", default=None, help="game, when stage 1's data folder is not named after one")
    sp.add_argument("--data", default=None, help="offline: the game folder with action-labeled train/test chunks")
    sp.add_argument("--max-chunks", type=int, default=None, help="load at most this many train chunks")
    sp.add_argument("--labels", default=None, help="offline: labeled frames, comma-separated to sweep")
    sp.add_argument("--decoder-input", choices=("policy", "idm"), default="policy",
                    help="offline: train the decoder on pi(o_t), what it decodes when acting (default), or on the "
                         "IDM latents of the labeled transitions")
    sp.add_argument("--decoder-steps", type=int, default=None, help="offline decoder training steps")
    sp.add_argument("--baseline", choices=("none", "bc"), default="none", help="bc: also BC from scratch on the labels")
    sp.add_argument("--bc-steps", type=int, default=None, help="BC-from-scratch training steps")
    sp.add_argument("--no-sl", action="store_true", help="online ablation: decoder trained by RL, no supervised step")
    sp.add_argument("--schedule-scale", type=float, default=None,
                    help="online: multiply the frame thresholds of the LR ramps and decoder schedule")
    ppo_flags(sp, "online: env frames (paper: 4,000,000)")
    sp.set_defaults(func=lambda a: stage3_offline(a) if a.mode == "offline" else stage3_online(a))

    sp = sub.add_parser("expert", help="PPO from scratch on the true actions (expert, or the baseline)")
    common(sp, "runs/expert")
    evaluation(sp)
    sp.add_argument("--env", required=True, help="Procgen game")
    sp.add_argument("--impala-scale", type=float, default=None, help="IMPALA width multiplier (cleanRL: 1)")
    ppo_flags(sp, "env frames (expert: 25M; the paper's PPO-from-scratch baseline: 4M)")
    sp.set_defaults(func=expert)

    sp = sub.add_parser("pipeline", help="the whole method and its baselines, then results.md and plots")
    sp.add_argument("--env", default="starpilot",
                    help="Procgen game (default starpilot, chosen by measurement for the CPU budget; see README)")
    sp.add_argument("--preset", choices=PRESETS, default="small", help="scale of every step (default: small, CPU)")
    sp.add_argument("--seed", type=int, default=0, help="seed of every step")
    sp.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    sp.add_argument("--amp", choices=("auto", "on", "off"), default="auto", help="bf16 autocast (see stage1 --help)")
    sp.add_argument("--out", default="runs/demo", help="pipeline folder: expert/, data/, lapo/, ppo_scratch/, results.md")
    sp.add_argument("--expert", default=None, help="use this policy checkpoint as the expert instead of training one")
    sp.add_argument("--ablations", action="store_true", help="also run online decoding without SL (the paper's no-SL)")
    sp.set_defaults(func=pipeline)

    sp = sub.add_parser("bench", help="time every stage on this machine (collects its own small data)")
    common(sp, None, resume=False)
    sp.add_argument("--steps", type=int, default=None, help="timed train steps per measurement (default 10; tiny: 5)")
    sp.add_argument("--warmup", type=int, default=2, help="untimed train steps before the timed ones")
    sp.add_argument("--ppo-updates", type=int, default=2, help="timed PPO updates, after one untimed warm-up update")
    sp.add_argument("--no-ppo", action="store_true",
                    help="skip the PPO measurements (at the paper preset one CPU update takes many minutes)")
    sp.add_argument("--frames", dest="bench_frames", type=int, default=None, metavar="N",
                    help="bigfish frames to collect (default: the preset's, at most 16,384), plus a quarter for test")
    sp.set_defaults(func=bench)

    sp = sub.add_parser("eval", help="evaluate any saved policy checkpoint")
    common(sp, "runs/eval")
    evaluation(sp)
    sp.add_argument("--checkpoint", required=True, help="a policy .pt written by this script")
    sp.add_argument("--env", default=None, help="game (default: the one the policy was trained on)")
    sp.set_defaults(func=eval_cmd)
    return p


def apply_preset(args):
    """Fill every flag left at None from the preset (command-specific keys first)."""
    preset = PRESETS[args.preset]
    cmd = "online" if args.cmd == "stage3" and getattr(args, "mode", None) == "online" else args.cmd
    for k, v in vars(args).items():
        if v is None:
            if f"{cmd}.{k}" in preset:
                setattr(args, k, preset[f"{cmd}.{k}"])
            elif k in preset:
                setattr(args, k, preset[k])
    if args.cmd == "eval" and args.eval_episodes is None:
        args.eval_episodes = 64
    return args


def parse_args(argv=None):
    return apply_preset(build_parser().parse_args(argv))


def main(argv=None):
    try:
        args = parse_args(argv)
        args.func(args)
    except LapoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact, continue with --resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
