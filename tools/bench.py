"""Throughput of every LAPO stage on this machine, timed through lapo.py's own train steps and loop.

    python tools/bench.py --preset paper|small|tiny [--steps N] [--warmup N] [--ppo-updates N] [--no-ppo] [--frames N]

Collects bigfish frames into a temporary folder, then times the stage-1 and stage-2 train steps (in fp32, and also
in bf16 autocast where the hardware has bf16 units), the stage-1 evaluation with its probe, window sampling, PPO
updates (expert and online decoding) and peak memory. Prints one line per measurement, a table and one JSON line
(also <out>/bench_summary.json with --out). Each stage-1 rate is also given as a share of what this host attains:
its FLOPs per sample (torch's FlopCounterMode, forward and backward: 4.41 GFLOP at paper) times samples/s, over the
rate of a 3x3 convolution (96 -> 96 channels, 32x32, batch 128, channels_last, forward and backward) in the same
precision. Hosts of one CPU kind differ up to 2x, so no fixed figure per kind can stand for this one.
"""
import json
import os
import resource  # Unix only
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: lapo.py
import numpy as np  # noqa: E402
import torch  # noqa: E402

import lapo  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


def parse(argv=None):
    p = lapo.Parser(description=__doc__.split("\n")[0])  # its errors are LapoErrors: one line, exit 2
    p.add_argument("--preset", choices=lapo.PRESETS, default="paper", help="configuration to time")
    p.add_argument("--seed", type=lapo.SEED, default=0, help=f"seed [{lapo.SEED.range}]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    p.add_argument("--torch-deterministic", type=int, choices=(0, 1), default=1,
                   help="1: deterministic CUDA kernels, lapo's default; 0: CUDA's own (time both to see the cost)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default=None,
                   help="bf16 autocast of collect and PPO (default: the preset's); stages 1-2 are timed per precision")
    p.add_argument("--out", default=None, help="also write <out>/bench_summary.json")
    p.add_argument("--steps", type=lapo.POS, default=None,
                   help=f"timed train steps per measurement (default 10; tiny: 5) [{lapo.POS.range}]")
    p.add_argument("--warmup", type=lapo.NONNEG, default=2,
                   help=f"untimed steps before the timed ones [{lapo.NONNEG.range}]")
    p.add_argument("--ppo-updates", type=lapo.POS, default=2,
                   help=f"timed PPO updates, after one untimed warm-up update [{lapo.POS.range}]")
    p.add_argument("--no-ppo", action="store_true", help="skip PPO (at the paper preset one CPU update takes minutes)")
    frames = lapo.num(int, 256)
    p.add_argument("--frames", type=frames, default=None, help="bigfish frames to collect (default: the preset's, "
                   f"at most 16,384), plus a quarter for test [{frames.range}]")
    p.set_defaults(func=bench)
    return p.parse_args(argv)


def flops(fn):
    """FLOPs of one call of fn, as torch's FlopCounterMode counts them (convolutions and matrix products, forward and
    backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def conv_rate(device, amp, warmup, reps=3):
    """This host's attainable FLOP/s in a precision: a 3x3 convolution, 96 -> 96 channels at 32x32, batch 128,
    channels_last, forward and backward (the gradients of its input and of its weights), the median of `reps`."""
    conv = torch.nn.Conv2d(96, 96, 3, padding=1).to(device, memory_format=torch.channels_last)
    x = torch.randn(128, 96, 32, 32, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()

    def step():
        with lapo.autocast(device, amp):
            y = conv(x)
        y.backward(torch.ones_like(y))
    times = []
    for _ in range(warmup + reps):
        timed(step, times, device)()
    return flops(step) / float(np.median(times[warmup:]))


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
    steps = (5 if args.preset == "tiny" else 10) if args.steps is None else args.steps
    frames = min(lapo.preset_defaults("collect", args.preset)["frames"], 16384) if args.frames is None else args.frames
    device, total, res, rows = lapo.get_device(args), args.warmup + steps, {}, []
    precisions = ("fp32", "bf16") if lapo.bf16_fast(device) else ("fp32",)  # bf16 units: time both precisions

    def args_of(*argv, amp=args.amp):  # another command's flags, with this preset, seed, device and amp
        argv += ("--preset", args.preset, "--seed", args.seed, "--device", args.device, "--torch-deterministic",
                 args.torch_deterministic)
        argv += ("--amp", amp) if amp else ()
        return lapo.parse_args([str(x) for x in argv])

    def num(v):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:#.3g}"

    def record(key, value, unit, what):
        res[key] = value
        rows.append((what, value, unit))
        print(f"bench: {what}: {num(value)} {unit}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        a = args_of("collect", "--env", "bigfish", "--out", os.path.join(tmp, "data"), "--frames", frames,
                    "--test-frames", frames // 4)
        data = lapo.collect(a)
        tracemalloc.start()  # counts every allocation of Python and NumPy while the loader runs
        train, test = lapo.load_split(data, "train"), lapo.load_split(data, "test")
        load_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        raw = train.obs.nbytes + test.obs.nbytes  # the uint8 frames as stored
        record("data_mem_x_frames", load_peak / raw, "x frame bytes",
               f"loader's peak memory, {raw / 2 ** 20:.0f} MiB of frames")
        with open(os.path.join(data, "collect_summary.json")) as f:
            collected = json.load(f)
        splits = (collected["train"], collected["test"])  # collect's own rate: env steps and writes, not env starts
        rate = sum(c["frames"] for c in splits) / sum(c["frames"] / c["frames_per_s"] for c in splits)
        record("collect_frames_per_s", rate, "frames/s", f"collect, random policy, {a.num_envs} envs")
        for prec in precisions:  # fp32 keys plain (compared with the authors'), bf16 keys suffixed _bf16
            run, sfx = os.path.join(tmp, f"run_{prec}"), "" if prec == "fp32" else "_bf16"
            for stage, build in (("stage1", lapo.build_stage1), ("stage2", lapo.build_stage2)):
                a = args_of(stage, "--data", data, "--out", run, amp="off" if prec == "fp32" else "on")
                every = a.eval_every
                setattr(a, f"{stage}_steps", total)
                a.eval_every = a.ckpt_every = a.log_every = total  # one evaluation and one checkpoint, at the end
                modules, opt, lr_fn, train_step, evaluate = build(a, train, test, device)
                if stage == "stage1" and "stage1_gflop_per_sample" not in res:  # (one untimed step, the same in bf16)
                    record("stage1_gflop_per_sample", flops(lambda: train_step(torch.Generator())) / a.batch_size
                           / 1e9, "GFLOP", "stage1 FLOPs per sample, forward and backward")
                step_t, eval_t = [], []
                train_step, evaluate = timed(train_step, step_t, device), timed(evaluate, eval_t, device)
                lapo.train_loop(stage, a, modules, opt, lr_fn, train_step, evaluate, total)  # the stage's own loop
                step_s = float(np.median(step_t[args.warmup:]))
                record(f"{stage}_samples_per_s{sfx}", a.batch_size / step_s, "samples/s",
                       f"{stage} train step, batch {a.batch_size}, {prec}")
                if stage == "stage1":
                    record(f"conv_gflop_per_s{sfx}", conv_rate(device, prec == "bf16", args.warmup) / 1e9, "GFLOP/s",
                           f"host's attainable rate (3x3 conv 96->96, 32x32, batch 128), {prec}")
                    record(f"stage1_pct{sfx}", 100 * a.batch_size / step_s * res["stage1_gflop_per_sample"]
                           / res[f"conv_gflop_per_s{sfx}"], "% of it", f"stage1 train step's FLOP/s, {prec}")
                    record(f"probe_eval_s{sfx}", eval_t[0], "s",
                           f"stage1 eval (test loss + probe on {a.probe_windows}), {prec}")
                    record(f"probe_eval_steps{sfx}", eval_t[0] / step_s, "train steps",
                           f"stage1 eval, as train steps, {prec}")
                    record(f"probe_eval_frac{sfx}", eval_t[0] / (every * step_s + eval_t[0]), "of wall time",
                           f"stage1 eval share at eval_every {every}, {prec}")
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
        run = os.path.join(tmp, "run_fp32")  # online decoding starts from the fp32 stages 1 and 2
        ppo_runs = () if args.no_ppo else (
            ("expert", lapo.expert, ("expert", "--env", "bigfish", "--out", os.path.join(tmp, "expert"))),
            ("online", lapo.stage3_online, ("stage3", "--mode", "online", "--out", run)))  # the RL+SL policy
        for stage, fn, argv in ppo_runs:
            a = args_of(*argv, "--eval-episodes", 1, "--eval-max-steps", 1)  # final evaluation: one env step
            a.frames = (1 + args.ppo_updates) * a.num_envs * a.num_steps  # one warm-up update, then the timed ones
            fn(a)
            curve = lapo.load_checkpoint(os.path.join(a.out, f"{stage}.pt"), ("policy",))["curve"]
            update_s = np.diff([c["frames"] / c["fps"] for c in curve])  # fps counts from the start of PPO
            amp = lapo.use_amp(a, device)
            record(f"{stage}_frames_per_s", a.num_envs * a.num_steps / np.median(update_s), "env frames/s",
                   f"PPO {stage}, {a.num_envs} envs x {a.num_steps} steps, {'bf16' if amp else 'fp32'}")
    print(f"\n{'measure':<60} {'value':>8}  unit")
    for what, v, unit in rows:
        print(f"{what:<60} {num(v):>8}  {unit}")
    out = {"bench": {"preset": args.preset, "device": str(device), "precisions": list(precisions),
                     "torch_deterministic": args.torch_deterministic,
                     "ppo_amp": None if args.no_ppo else amp,
                     "threads": torch.get_num_threads(), "steps": steps, "warmup": args.warmup,
                     "ppo_updates": args.ppo_updates, "frames": len(train) + len(test), **res}}
    if args.out:
        lapo.write_summary(args.out, "bench", out)  # bench_summary.json, and the JSON line
    else:
        print(json.dumps(out), flush=True)
    return out["bench"]


def main(argv=None):
    lapo.main(argv, parse, "nothing was kept (bench writes only at the end)")


if __name__ == "__main__":
    main()
