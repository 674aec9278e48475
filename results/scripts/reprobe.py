"""The probe again, on finished stage-1 runs, with its windows drawn without replacement. Until commit bcc511d (the
review fixes of 2026-11-30) the probe's windows were drawn with replacement, so a window could sit in both its train
and its test half. This script measures both ways on each run's final IDM: the old windows (it reproduces the
summary's probe_acc) and the new ones, and prints mean ± SE per configuration and the paired differences. Run it
with a copy of the lapo.py that trained the runs beside it (runs with flags removed since: a checkout of 1675f4a).

    python results/scripts/reprobe.py RUNS [RUNS ...]   # folders holding stage1.pt; grouped by name without -s<seed>
"""
import argparse
import os
import re
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
from pipeline import read_json, stats  # noqa: E402

import lapo  # noqa: E402


def reprobe(run, splits):
    """{"old": probe accuracy on windows drawn with replacement, "new": without, "summary": the run's own}"""
    path = os.path.join(run, "reprobe.json")
    if os.path.exists(path):
        return read_json(path)
    ck = lapo.load_checkpoint(os.path.join(run, "stage1.pt"), ("stage1",))
    cfg = ck["config"]
    if cfg["data"] not in splits:
        splits[cfg["data"]] = lapo.load_split(cfg["data"], "test")
    test, args = splits[cfg["data"]], argparse.Namespace(**cfg)
    idm = lapo.build_idm(cfg)
    idm.load_state_dict(ck["idm"])
    amp = lapo.use_amp(args, torch.device("cpu"))  # as the run evaluated
    g = torch.Generator().manual_seed(12345)
    test.sample(args.eval_windows, g)  # stage 1 draws the test loss's windows first
    state, windows = g.get_state(), {"old": test.sample(args.probe_windows, g)}  # with replacement (until bcc511d)
    g.set_state(state)
    windows["new"] = test.centres[torch.randperm(len(test.centres), generator=g)[:args.probe_windows]]  # without
    result = {"summary": (read_json(os.path.join(run, "stage1_summary.json")) or {}).get("probe_acc")}
    for name, c in windows.items():
        z = lapo.idm_latents(idm, test, c, torch.device("cpu"), amp)
        result[name] = lapo.probe_accuracy(z, test.labels(c), args.seed)[0]
    lapo.write_json(path, result)
    return result


def main():
    runs = [r for r in sys.argv[1:] if os.path.exists(os.path.join(r, "stage1_summary.json"))]
    splits, groups = {}, {}
    for run in sorted(runs):
        name = os.path.basename(os.path.normpath(run))
        config, seed = re.fullmatch(r"(.*)-s(\d+)", name).groups()
        groups.setdefault(config, {})[int(seed)] = reprobe(run, splits)
        print(f"{name:20s} {groups[config][int(seed)]}", flush=True)
    base = groups.get("paper", {})
    for config, seeds in groups.items():
        for kind in ("old", "new"):
            paired = [seeds[s][kind] - base[s][kind] for s in seeds if s in base]
            print(f"{config:14s} {kind}: {stats([v[kind] for v in seeds.values()])} | paired - paper: {stats(paired)}")


if __name__ == "__main__":
    main()
