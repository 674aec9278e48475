"""LAPO and its baselines over seeds in one command, then a results table (mean ± SE over seeds) and plots.

    python tools/pipeline.py --env starpilot --preset small --seeds 0,1,2 --out runs/demo [--expert PATH] [--ablations]
        [--flags stage1='--stage1-steps 12000' ...]   # extra lapo.py flags for one command (repeatable)

Shared by all seeds: the expert (<out>/expert) and the data it collects (<out>/data/<game>). Per seed k, in
<out>/seed<k>/: lapo/ (stages 1-3: offline decoding + BC from scratch, online RL+SL, with --ablations no-SL),
supervised/ (the same IDM trained on the true actions: the ceiling of the probe) and ppo_scratch/ (PPO from
scratch at the online budget). Each step calls lapo.py's own stage function, prints the equivalent command
line, and is skipped when its summary exists: rerun the same command to continue an interrupted pipeline.
"""
import argparse
import glob
import json
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: lapo.py
import numpy as np  # noqa: E402
import torch  # noqa: E402

import lapo  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/: the diagnostics
import diagnose  # noqa: E402


def seed_list(text):
    """argparse type of --seeds: distinct comma-separated integers, each in lapo's seed range."""
    try:
        seeds = [lapo.SEED(s) for s in text.split(",")]
    except argparse.ArgumentTypeError:
        seeds = []
    if not seeds or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers {lapo.SEED.range}, got {text!r}")
    return seeds


# --flags: a placeholder for each command's required arguments, so its own parser can check extra flags alone
PLACEHOLDER = {"expert": ["--env", "bigfish"], "collect": ["--env", "bigfish"], "stage1": ["--data", "-"],
               "stage2": ["--data", "-"], "stage3": ["--mode", "online"]}
# settings the pipeline makes itself (argparse dests): --flags may not change them, however they are spelled
OWNED = ("preset", "seed", "out", "resume", "device", "amp", "data", "env", "mode", "policy", "no_sl", "baseline",
         "expert_return")


def extra_flags(text):
    """argparse type of --flags: CMD=FLAGS, lapo.py flags for one command, checked by that command's own parser.
    -> (command, its flags, {setting: value} they change)"""
    cmd, eq, rest = text.partition("=")
    if cmd not in PLACEHOLDER or not eq:
        raise argparse.ArgumentTypeError(f"expected CMD=FLAGS with CMD one of {', '.join(PLACEHOLDER)}, got {text!r}")
    try:
        argv = shlex.split(rest)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}")
    if {"-h", "--help"} & set(argv):
        raise argparse.ArgumentTypeError("--help is not a flag to pass on; run python lapo.py CMD --help")
    parser = lapo.build_parser()  # a bad flag or value raises a one-line LapoError here
    base, new = (vars(parser.parse_args([cmd, *more, *PLACEHOLDER[cmd]])) for more in ([], argv))
    changed = {k: v for k, v in new.items() if k != "func" and base[k] != v}
    owned = [k for k in OWNED if k in changed]
    if owned:
        raise argparse.ArgumentTypeError(f"--{owned[0].replace('_', '-')} is set by the pipeline itself")
    return cmd, argv, changed


KINDS = ("stage1", "stage2", "offline", "online", "supervised", "PPO")  # --only: words of the steps' names


def step_kinds(text):
    kinds = text.split(",")
    if not set(kinds) <= set(KINDS):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(KINDS)}, comma-separated; got {text!r}")
    return kinds


def parse(argv=None):
    p = lapo.Parser(description=__doc__.split("\n")[0])  # its errors are LapoErrors: one line, exit 2
    p.add_argument("--env", default="starpilot", help="Procgen game (starpilot: the game of the README's results)")
    p.add_argument("--preset", choices=lapo.PRESETS, default="small", help="scale of every step (small: a CPU)")
    p.add_argument("--seeds", type=seed_list, default=[0], help="seeds, comma-separated (default 0); the first "
                   f"one also trains the expert and collects the data [each {lapo.SEED.range}]")
    p.add_argument("--out", default="runs/demo", help="pipeline folder: expert/, data/, seed<k>/, results.md")
    p.add_argument("--expert", default=None, help="use this policy checkpoint as the expert instead of training one")
    p.add_argument("--ablations", action="store_true", help="also online decoding without SL (the paper's no-SL)")
    p.add_argument("--flags", type=extra_flags, action="append", default=[], metavar="CMD=FLAGS",
                   help="extra lapo.py flags for one command (repeatable), e.g. stage1='--stage1-steps 12000': stage1 "
                   "flags reach the latent and the supervised IDM, stage3 flags offline and online decoding and PPO "
                   f"from scratch's budget (--frames); CMD is one of {', '.join(PLACEHOLDER)}")
    p.add_argument("--only", type=step_kinds, default=None, metavar="KINDS", help="run only these steps of every seed "
                   f"(after the expert and the data), comma-separated from {', '.join(KINDS)}; no report")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    p.add_argument("--amp", choices=("auto", "on", "off"), default=None, help="bf16 autocast (default: the preset's)")
    p.set_defaults(func=pipeline)
    return p.parse_args(argv)


# ==============================================================================================
# RUN: every step is one lapo stage function, skipped when its summary exists
# ==============================================================================================
def configuration(args):
    """What every step's result depends on; a rerun may add seeds and --ablations, but not change these."""
    flags = {}
    for cmd, _, changed in args.flags:
        flags.setdefault(cmd, {}).update(changed)
    setup = {"env": args.env, "preset": args.preset, "expert": args.expert and os.path.abspath(args.expert),
             "flags": flags}
    return json.loads(json.dumps(setup))  # as it reads back from pipeline_config.json


def check_configuration(root, setup):
    """Refuse a rerun into `root` with another configuration: its finished steps would be skipped, and mixed in."""
    path = os.path.join(root, "pipeline_config.json")
    saved = read_json(path)
    if saved is None and read_json(os.path.join(root, "pipeline_steps.json")):  # a run from before the file
        old = read_json(os.path.join(root, "results.json")) or {}
        saved = {"flags": {}, **({"env": old["game"], "preset": old["preset"]} if old else {})}
    changed = [f"{k}: {saved[k]} -> {setup[k]}" for k in setup if saved and k in saved and saved[k] != setup[k]]
    if changed:
        raise lapo.LapoError(f"{root} holds a pipeline run with another configuration ({'; '.join(changed)}); rerun "
                             "with the same flags (more --seeds and --ablations are fine), or use another --out")
    lapo.write_json(path, setup)


def plan(args, x, norm):
    """Every step: (name, stage function, lapo.py argv, seed, its summary file, its checkpoint or None). User flags
    (--flags) come right after the command, so the pipeline's own settings after them always win."""
    root, game, seeds = args.out, args.env, args.seeds
    data, flags = os.path.join(root, "data", game), common_flags(args)
    todo = []
    if not args.expert:
        todo.append(("expert", lapo.expert, ["expert", *x["expert"], "--env", game, "--out",
                                             os.path.join(root, "expert")], seeds[0],
                     os.path.join(root, "expert", "expert_summary.json"), os.path.join(root, "expert",
                                                                                     "expert_state.pt")))
    todo.append(("collect", lapo.collect, ["collect", *x["collect"], "--env", game, "--policy",
                                           args.expert or os.path.join(root, "expert", "expert.pt"),
                                           "--out", os.path.join(root, "data")], seeds[0],
                 os.path.join(data, "collect_summary.json"), None))
    for k in seeds:
        run, sup, scratch = (os.path.join(root, f"seed{k}", d) for d in ("lapo", "supervised", "ppo_scratch"))
        online = ["stage3", *x["stage3"], "--mode", "online", *norm]
        frames = lapo.parse_args([*map(str, online), "--out", run, *flags]).frames  # PPO from scratch's budget too
        for name, fn, argv, out, done, ckpt in (
                ("stage1", lapo.stage1, ["stage1", *x["stage1"], "--data", data], run, "stage1", "stage1.pt"),
                ("stage2", lapo.stage2, ["stage2", *x["stage2"], "--data", data], run, "stage2", "stage2.pt"),
                ("stage3 offline + BC from scratch", lapo.stage3_offline, ["stage3", *x["stage3"], "--mode",
                 "offline", "--baseline", "bc", "--data", data, *norm], run, "stage3_offline", None),
                ("stage3 online (RL+SL)", lapo.stage3_online, online, run, "stage3_online", "online_state.pt"),
                ("supervised IDM", diagnose.supervised_idm, ["supervised-idm", *x["stage1"], "--data", data], sup,
                 "stage1", "stage1.pt"),
                ("PPO from scratch", lapo.expert, ["expert", "--env", game, "--frames", frames, *norm], scratch,
                 "expert", "expert_state.pt"),
                *([("stage3 online, no SL", lapo.stage3_online, [*online, "--no-sl"], run, "stage3_online_nosl",
                    "online_nosl_state.pt")] if args.ablations else [])):
            todo.append((f"seed{k} {name}", fn, [*argv, "--out", out], k, os.path.join(out, f"{done}_summary.json"),
                         ckpt and os.path.join(out, ckpt)))
    return todo


def common_flags(args):
    return ["--preset", args.preset, "--device", args.device] + (["--amp", args.amp] if args.amp else [])


def parse_step(argv):
    """A step's command line -> its arguments: lapo.py's commands, or the supervised IDM of tools/diagnose.py."""
    return diagnose.parse(argv) if argv[0] == "supervised-idm" else lapo.parse_args(argv)


def check_plan(todo, flags):
    """Parse every step's command line before any work (a bad combination of flags fails now, not hours in), and
    check that online decoding and PPO from scratch get the same frame budget (each rounds to whole rollouts)."""
    parsed = {name: parse_step([*map(str, argv), *flags, "--seed", str(seed)]) for name, _, argv, seed, _, _ in todo}
    for name, a in parsed.items():
        if name.endswith("online (RL+SL)"):
            b = parsed[name.replace("stage3 online (RL+SL)", "PPO from scratch")]
            got = [x.frames // (x.num_envs * x.num_steps) * x.num_envs * x.num_steps for x in (a, b)]
            if got[0] != got[1]:
                raise lapo.LapoError(f"online decoding would run {got[0]} frames and PPO from scratch {got[1]}: "
                                     f"choose a stage3 --frames that is a multiple of both rollouts "
                                     f"({a.num_envs * a.num_steps} and {b.num_envs * b.num_steps} frames)")


def pipeline(args):
    lapo.check_game(args.env)
    root, game = args.out, args.env
    data, flags = os.path.join(root, "data", game), common_flags(args)
    x = {cmd: [f for c, fl, _ in args.flags if c == cmd for f in fl] for cmd in PLACEHOLDER}  # --flags, per command
    if args.expert and x["expert"]:
        raise lapo.LapoError("--flags expert=... trains the expert, but --expert PATH says not to train one")
    check_plan(plan(args, x, ["--expert-return", "1.0"]), flags)  # the expert's return is not known yet
    check_configuration(root, configuration(args))
    steps_path = os.path.join(root, "pipeline_steps.json")  # per step: wall time, device and precision it ran with
    steps = read_json(steps_path) or {}

    def step(name, fn, argv, seed, done, ckpt):
        if os.path.exists(done):
            print(f"pipeline: {name} done ({done})", flush=True)
            return
        resume = ["--resume"] if ckpt and os.path.exists(ckpt) else []
        # seconds already trained: the checkpoint's own clock also counts a process killed before it could report
        prior = lapo.load_checkpoint(ckpt, ("stage1", "stage2", "ppo")).get("wall_s", 0.0) if resume else 0.0
        argv = [str(a) for a in argv] + flags + ["--seed", str(seed)] + resume
        script = "tools/diagnose.py" if argv[0] == "supervised-idm" else "lapo.py"
        print(f"\npipeline: {name}: python {script} {shlex.join(argv)}", flush=True)
        a, t0 = parse_step(argv), time.time()
        device = lapo.get_device(a)
        fn(a)
        steps[name] = {"wall_s": prior + time.time() - t0, "device": str(device), "amp": lapo.use_amp(a, device)}
        lapo.write_json(steps_path, steps)

    first = plan(args, x, [])
    for s in first[:1 + (not args.expert)]:  # the expert, and the data it collects
        if s[0] == "collect" and os.path.isdir(data) and not os.path.exists(s[4]):  # never delete it: not ours
            raise lapo.LapoError(f"{data} exists without collect_summary.json: an interrupted collection, or files of "
                                 "yours. Nothing was deleted: remove it if it is an interrupted collection, or choose "
                                 "another --out")
        step(*s)
    ex = expert_return(root, data, args)[0]  # None: no episode ended
    for s in plan(args, x, [] if ex is None else ["--expert-return", ex])[1 + (not args.expert):]:
        if not args.only or any(k in s[0] for k in args.only):
            step(*s)
    if args.only:
        return print(f"pipeline: --only {','.join(args.only)} done; run again without --only for the rest and the "
                     "report", flush=True)
    report(root, game, args)


# ==============================================================================================
# REPORT: per-seed numbers -> mean ± standard error over seeds -> results.md, results.json, plots
# ==============================================================================================
def curve_returns(curve):
    """Mean episode return over the last 20% of frames and over the first 10% (at least the first update)."""
    total = curve[-1]["frames"]

    def mean(points):
        pts = [c for c in points if c["mean_return"] is not None]
        n = sum(c["episodes"] for c in pts)
        return sum(c["mean_return"] * c["episodes"] for c in pts) / n if n else None
    return (mean([c for c in curve if c["frames"] > 0.8 * total]),
            mean([c for c in curve if c["frames"] <= max(0.1 * total, curve[0]["frames"])]))


def curve_band(curves):
    """Learning curves of several seeds -> (frames, mean, SE over seeds) of each seed's moving average over ~5% of
    the updates; updates where no episode ended are left out, not counted as 0. Masked where no value (SE: < 2)."""
    m = min(map(len, curves))
    r = np.array([[np.nan if c["mean_return"] is None else c["mean_return"] for c in cv[:m]] for cv in curves])
    k, ok = max(1, m // 20), np.isfinite(r)
    window_sum = lambda v: np.lib.stride_tricks.sliding_window_view(v, k, axis=1).sum(-1)  # noqa: E731
    with np.errstate(invalid="ignore"):
        s = np.ma.masked_invalid(window_sum(np.where(ok, r, 0)) / window_sum(ok))
    return [c["frames"] for c in curves[0][k - 1:m]], s.mean(0), s.std(0, ddof=1) / np.sqrt(s.count(0))


def diff(a, b):
    return None if a is None or b is None else a - b


def seed_numbers(d):
    """Every number of one seed's folder, flat: probe accuracies, offline returns, online windows, differences."""
    s1 = read_json(os.path.join(d, "lapo", "stage1_summary.json"))
    sup = read_json(os.path.join(d, "supervised", "stage1_summary.json")) or {}
    x = {"probe_latent": s1.get("probe_acc"), "probe_supervised": sup.get("probe_acc"),
         "probe_majority": s1.get("probe_majority")}
    lat, sup_acc = x["probe_latent"], x["probe_supervised"]
    x["probe_ratio"] = lat / sup_acc if lat is not None and sup_acc else None
    for r in read_json(os.path.join(d, "lapo", "stage3_offline_summary.json"))["results"]:
        n, x["offline_episodes"] = r["labels"], r["eval_episodes"]
        x[f"offline_{r['method']}_{n}"] = r["eval_mean_return"]
        x[f"offline_diff_{n}"] = diff(x.get(f"offline_lapo_{n}"), x.get(f"offline_bc_{n}"))
    for name, f in (("rlsl", "lapo/online.pt"), ("scratch", "ppo_scratch/expert.pt"), ("nosl", "lapo/online_nosl.pt")):
        if os.path.exists(os.path.join(d, f)):
            curve = lapo.load_checkpoint(os.path.join(d, f), ("policy",))["curve"]
            x[f"online_{name}_last20"], x[f"online_{name}_first10"] = curve_returns(curve)
    for w in ("last20", "first10"):
        x[f"online_diff_{w}"] = diff(x.get(f"online_rlsl_{w}"), x.get(f"online_scratch_{w}"))
    return x


def expert_return(root, data, args):
    """The return to normalize by, of the expert whose data we learn from (the REFERENCE table's convention for own
    data): its own evaluation (the first episodes of each env) where the pipeline trained it, else the mean of its
    episodes in the collected data, which over-counts short ones. -> (return or None: no episode ended, its words)"""
    own = read_json(os.path.join(root, "expert", "expert_summary.json")) if not args.expert else None
    if own:
        return own["eval_mean_return"], f"our own expert's mean return over {own['eval_episodes']} evaluation episodes"
    train = read_json(os.path.join(data, "collect_summary.json"))["train"]
    return train["mean_return"], f"the mean return of the policy's {train['episodes']} episodes in the collected data"


def read_json(path):
    """A run's JSON file (a summary, the pipeline's own records) -> its value; None where it does not exist yet."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError:
        raise lapo.LapoError(f"{path} is corrupt; delete it (the step that wrote it will rerun)")


def read_metrics(path):
    """The records of a metrics.jsonl. A line that does not parse (its writer was killed mid-line, or the disk was
    full) is skipped with a note."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"note: {path}: line {i + 1} is not a JSON record (half a record of a killed run?); skipped",
                  flush=True)
    return records


def stats(values):
    """Mean, standard error (None below 2 values) and n over seeds; missing values are left out."""
    v = np.array([x for x in values if x is not None], float)
    return {"mean": float(v.mean()) if len(v) else None,
            "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None, "n": len(v)}


def fmt_stats(values, digits=3):
    """'mean ± SE' over seeds as text ('n/a' where there is no value, or no SE from a single one)."""
    s = stats(values)
    num = lambda v: "n/a" if v is None else f"{v:.{digits}f}"  # noqa: E731
    return "n/a" if s["mean"] is None else f"{num(s['mean'])} ± {num(s['se'])}"


class FrameBlindAgent:
    """Samples each action at a fixed probability whatever the frame (the interface evaluate_policy uses)."""

    def __init__(self, probs, seed):
        self.probs, self.rng = probs, np.random.default_rng(seed)

    def to(self, device):
        return self

    def eval(self):
        return self

    def act(self, obs, sample=True, amp=False):
        return self.rng.choice(lapo.NUM_ACTIONS, len(obs), p=self.probs), np.zeros(len(obs), np.float32)


def action_frequencies(data):
    """The frequency of each action in a data folder's train split (None: no chunk, or no actions recorded)."""
    try:
        ta = np.concatenate([np.load(f)["ta"] for f in sorted(glob.glob(os.path.join(data, "train", "*.npz")))])
    except (KeyError, ValueError):
        return None
    return np.bincount(ta, minlength=lapo.NUM_ACTIONS) / len(ta)


def evaluate_frame_blind(probs, game, episodes, seed, max_steps=None):
    """Evaluate a FrameBlindAgent as `eval --seed seed` evaluates a policy -> mean, SE over episodes, episodes."""
    rets = lapo.evaluate_policy(FrameBlindAgent(probs, seed + 20_000), game, episodes, seed + 20_000,
                                torch.device("cpu"), max_steps=max_steps)
    s = stats(rets)
    return {"mean": s["mean"], "se": s["se"], "episodes": s["n"]}


def frame_blind(root, data, game, episodes, max_steps, seed):
    """The reference a decoded policy must beat to show that it reads the frame: the policy that samples the
    data's action frequencies and ignores the frame (a decoder on uninformative latents acts like it). Evaluated
    once, on as many episodes as the offline policies; cached in <root>/frame_blind.json. None: no actions."""
    path = os.path.join(root, "frame_blind.json")
    if os.path.exists(path):
        return read_json(path)
    probs = action_frequencies(data)
    if probs is None:
        return None
    out = {**evaluate_frame_blind(probs, game, episodes, seed, max_steps), "action_probs": probs.tolist()}
    lapo.write_json(path, out)
    return out


def cpu_model():
    with open("/proc/cpuinfo") as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown")


def report(root, game, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seeds, data = args.seeds, os.path.join(root, "data", game)
    (ex, source), rnd = expert_return(root, data, args), lapo.SCORES[game][0]
    ok = ex is not None and ex > rnd  # normalizing needs an expert better than random
    exs = "n/a (no episode ended)" if ex is None else f"{ex:.2f}"
    per_seed = {k: seed_numbers(os.path.join(root, f"seed{k}")) for k in seeds}
    labels = sorted({int(key[len("offline_diff_"):]) for x in per_seed.values() for key in x
                     if key.startswith("offline_diff_")})
    episodes = sorted({x.get("offline_episodes") for x in per_seed.values()} - {None})
    eval_episodes, preset = "/".join(map(str, episodes)) or "n/a", lapo.preset_defaults("eval", args.preset)
    blind = frame_blind(root, data, game, episodes[-1] if episodes else preset["eval_episodes"],
                        preset.get("eval_max_steps"), seeds[0])
    rows = [("probe accuracy, latent IDM", "probe_latent", "acc"),  # (row name, key, kind: acc | ret | diff)
            ("probe accuracy, supervised IDM", "probe_supervised", "acc"),
            ("probe accuracy ratio, latent / supervised", "probe_ratio", "acc"),
            ("majority-class rate", "probe_majority", "acc")]
    for n in labels:
        rows += [(f"offline, {n} labels: LAPO decoder", f"offline_lapo_{n}", "ret"),
                 (f"offline, {n} labels: BC from scratch", f"offline_bc_{n}", "ret"),
                 (f"offline, {n} labels: LAPO - BC", f"offline_diff_{n}", "diff")]
    for w, what in (("last20", "last 20% of frames"), ("first10", "first 10% of frames")):
        rows += [(f"online, {what}: RL+SL", f"online_rlsl_{w}", "ret"),
                 (f"online, {what}: PPO from scratch", f"online_scratch_{w}", "ret"),
                 (f"online, {what}: RL+SL - PPO", f"online_diff_{w}", "diff")]
        rows += [(f"online, {what}: no SL", f"online_nosl_{w}", "ret")] if args.ablations else []
    agg = {}
    for _, key, kind in rows:
        s = agg[key] = stats([per_seed[k].get(key) for k in seeds])
        if kind != "acc" and ok and s["mean"] is not None:  # normalized = (R - random) / (expert - random)
            s["normalized_mean"] = (s["mean"] - (rnd if kind == "ret" else 0)) / (ex - rnd)
            s["normalized_se"] = None if s["se"] is None else s["se"] / (ex - rnd)
        if kind == "diff":
            s["exceeds_2se"] = None if s["se"] is None else abs(s["mean"]) > 2 * s["se"]

    def num(v, kind):
        return "n/a" if v is None else f"{v:.3f}" if kind == "acc" else f"{v:.2f}"

    def pm(m, se, kind):
        return "n/a" if m is None else f"{num(m, kind)} ± {num(se, kind)}"

    steps = read_json(os.path.join(root, "pipeline_steps.json")) or {}
    bf16, yes = torch.ops.mkldnn._is_mkldnn_bf16_supported(), {None: "n/a", True: "yes", False: "no"}
    devices, amps = sorted({s["device"] for s in steps.values()}), tuple(sorted({s["amp"] for s in steps.values()}))
    amp = {(True,): "on", (False,): "off, fp32", (): "n/a"}.get(amps, "mixed, see the steps")
    lines = [f"# LAPO pipeline results: {game}, preset `{args.preset}`, seeds {','.join(map(str, seeds))}", "",
             "Extra lapo.py flags (`--flags`): " + ("; ".join(f"`{c}={shlex.join(f)}`" for c, f, _ in args.flags)
                                                    or "none (the preset as it is)") + ".", "",
             f"Hardware: CPU `{cpu_model()}`, bf16 units: {yes[bf16]}, device {', '.join(devices) or 'n/a'}; "
             f"bf16 autocast (`--amp`): {amp}.", "",
             f"Normalized return = (R - random) / (expert - random), random = {rnd} (the REFERENCE table), expert = "
             f"{exs}: {source} (passed to every step as `--expert-return`), not the paper's expert." + ("" if ok else
             " **This expert is no better than random**: normalized returns are undefined (n/a) and the comparisons "
             "below say nothing about LAPO. Give the expert more frames (`--expert PATH`, or a larger preset)."), "",
             "Mean ± standard error over seeds (n seeds; SE n/a with one). A difference is paired per seed. Offline "
             f"returns: each policy's mean over {eval_episodes} evaluation episodes. Online returns are the mean "
             "episode return during training, from the policies' learning curves.", "",
             "Frame-blind reference: a policy that samples the data's action frequencies and ignores the frame "
             "scores " + ("n/a (the data has no actions)" if blind is None else
                          f"{blind['mean']:.2f} ± {blind['se'] or 0:.2f} (SE over {blind['episodes']} episodes)") +
             ". A decoder fed latents that carry nothing acts like it, so a decoded policy below this line shows no "
             "use of the frame, whatever its lead over BC.", "",
             "| quantity | mean ± SE | n | normalized | difference > 2 SE |", "|---|---|---|---|---|"]
    for name, key, kind in rows:
        s = agg[key]
        normed = pm(s.get("normalized_mean"), s.get("normalized_se"), "ret") if kind != "acc" and ok else \
            "" if kind == "acc" else "n/a"
        lines.append(f"| {name} | {pm(s['mean'], s['se'], kind)} | {s['n']} | {normed} | "
                     f"{yes[s['exceeds_2se']] if kind == 'diff' else ''} |")
    lines += ["", "Per seed:", "", "| quantity | " + " | ".join(f"seed {k}" for k in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    lines += [f"| {name} | {' | '.join(num(per_seed[k].get(key), kind) for k in seeds)} |" for name, key, kind in rows]
    lines += ["", "| step | device | bf16 autocast | wall time |", "|---|---|---|---|"]
    lines += [f"| {k} | {s['device']} | {yes[s['amp']]} | {lapo.fmt_time(s['wall_s'])} |" for k, s in steps.items()]
    lines += [f"| total | | | {lapo.fmt_time(sum(s['wall_s'] for s in steps.values()))} |", ""]

    def levels(ax):
        if ex is not None:
            ax.axhline(ex, ls="--", c="gray", lw=1, label="expert")
        ax.axhline(rnd, ls=":", c="gray", lw=1, label="random")
        if blind is not None:
            ax.axhline(blind["mean"], ls="-.", c="gray", lw=1, label="frame-blind (data's action frequencies)")

    def band(ax, x, mean, se, label):
        ax.plot(x, mean, "o-" if len(x) < 20 else "-", label=label)
        if len(seeds) > 1:
            ax.fill_between(x, mean - se, mean + se, alpha=0.25)

    plots = []
    fig, ax = plt.subplots(figsize=(5, 3.5))  # return vs number of labels (the paper's offline figure)
    for method, label in (("lapo", "LAPO (decoder on latent policy)"), ("bc", "BC from scratch")):
        s = [agg[f"offline_{method}_{n}"] for n in labels]
        band(ax, labels, np.array([x["mean"] for x in s], float), np.array([x["se"] for x in s], float), label)
    levels(ax)
    ax.set(xscale="log", xlabel="labeled frames", ylabel="mean return", title=f"offline decoding, {game}")
    ax.set_xticks(labels, [str(n) for n in labels], minor=False)
    ax.minorticks_off()
    ax.legend(fontsize=7)
    plots.append(("offline.png", fig))
    fig, ax = plt.subplots(figsize=(5, 3.5))  # learning curves (the paper's online figure)
    for name, f in (("LAPO online (RL+SL)", "lapo/online.pt"), ("LAPO online, no SL", "lapo/online_nosl.pt"),
                    ("PPO from scratch", "ppo_scratch/expert.pt")):
        paths = [os.path.join(root, f"seed{k}", f) for k in seeds]
        curves = [lapo.load_checkpoint(p, ("policy",))["curve"] for p in paths if os.path.exists(p)]
        if curves:
            band(ax, *curve_band(curves), name)
    levels(ax)
    ax.set(xlabel="env frames", ylabel="mean return", title=f"online, {game}")
    ax.legend(fontsize=7)
    plots.append(("online.png", fig))
    plots += latent_and_fdm_plots(plt, os.path.join(root, f"seed{seeds[0]}", "lapo"), data, game)
    for name, fig in plots:
        fig.tight_layout()
        fig.savefig(os.path.join(root, name), dpi=110)
        plt.close(fig)
        lines.append(f"![{name}]({name})")
    lapo.write_json(os.path.join(root, "results.json"), {
        "game": game, "preset": args.preset, "flags": configuration(args)["flags"], "seeds": seeds,
        "expert_return": ex, "random_return": rnd, "frame_blind": blind,
        "normalized": ok, "cpu": cpu_model(), "bf16_units": bf16, "amp": amp, "per_seed": per_seed,
        "aggregate": agg, "steps": steps})
    with open(os.path.join(root, "results.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(root, "results.md.tmp"), os.path.join(root, "results.md"))
    print("\n".join(ln for ln in lines if not ln.startswith("![")), flush=True)
    print(f"pipeline: wrote {root}/results.md, results.json and {', '.join(n for n, _ in plots)}", flush=True)


def latent_and_fdm_plots(plt, run, data, game):
    """latents.png: a PCA of the IDM's latents coloured by true action; fdm.png: FDM predictions. One run."""
    cpu, plots = torch.device("cpu"), []
    idm, ck = lapo.load_stage1(run, cpu)
    test = lapo.load_split(data, "test")
    if test.ta is not None:
        c = test.sample(min(2048, len(test.centres)), torch.Generator().manual_seed(0))
        z, y = lapo.idm_latents(idm, test, c, cpu, False), test.labels(c).numpy()
        z = z - z.mean(0)
        xy = (z @ torch.linalg.svd(z, full_matrices=False)[2][:2].T).numpy()
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for a in np.unique(y):
            ax.scatter(*xy[y == a].T, s=4, color=plt.get_cmap("tab20")(a), label=lapo.ACTION_NAMES[a])
        ax.set(title=f"IDM latents (PCA), coloured by true action, {game}", xticks=[], yticks=[])
        ax.legend(markerscale=3, fontsize=6, ncol=2, loc="best")
        plots.append(("latents.png", fig))
    fdm = lapo.build_fdm(ck["config"])
    fdm.load_state_dict(ck["fdm"])
    fdm.eval()
    w = test.windows(test.sample(512, torch.Generator().manual_seed(1)), cpu)
    w = w[(w[:, 2].float() - w[:, 1].float()).abs().mean((1, 2, 3)).argsort(descending=True)[:6]]  # most motion
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
    return plots + [("fdm.png", fig)]


def main(argv=None):
    lapo.main(argv, parse, "rerun the same command to continue (finished steps are skipped)")


if __name__ == "__main__":
    main()
