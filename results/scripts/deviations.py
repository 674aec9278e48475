"""Issue 22's test of the small-scale deviations: each against the paper's module at `small` on starpilot, 3 seeds,
same data and budget. Ran at commit 1675f4a (the last one with the flags --idm-diff, --fdm-residual, --vq-count-init
and --decoder-std); check it out to rerun. A queue of resumable pieces: run it again and it continues where it
stopped (finished runs are skipped, an interrupted stage resumes from its checkpoint).

    python results/scripts/deviations.py runs/deviations          # collect, 12 stage-1 runs, 3 stage-2 runs, decoders
    python results/scripts/deviations.py runs/deviations --report # the table, from what has finished

Stage 1 (probe accuracy): paper modules (all flags 0) vs each flag alone on top of them. Data: random-policy
starpilot at the `small` preset (65,536 train frames, 8,192 test). --decoder-std: on each seed's paper-module
stage 1 and its stage 2, the offline decoder's held-out accuracy at 64/256/1,024 labels, std 0 vs 1, same init.
"""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
from pipeline import read_json, stats  # noqa: E402

import lapo  # noqa: E402

CONFIGS = {"paper": [], "idm_diff": ["--idm-diff", "1"], "fdm_residual": ["--fdm-residual", "1"],
           "vq_count_init": ["--vq-count-init", "1"]}
BASE = ["--idm-diff", "0", "--fdm-residual", "0", "--vq-count-init", "0"]
SEEDS, LABELS = (0, 1, 2), (64, 256, 1024)
DECODER_STEPS = (lapo.preset_defaults("stage3", "small") if hasattr(lapo, "preset_defaults")  # (after 1675f4a)
                 else lapo.PRESETS["small"])["decoder_steps"]


def run(*argv, lapo_py=os.path.join(ROOT, "lapo.py")):
    print("+ lapo.py", " ".join(argv), flush=True)
    subprocess.run([sys.executable, lapo_py, *argv], check=True)


def piece_cmd(lapo_py, out, stage, argv):
    """Run one stage into `out` unless its summary exists; resume it when a checkpoint is there."""
    if os.path.exists(os.path.join(out, f"{stage}_summary.json")):
        return
    resume = ["--resume"] if os.path.exists(os.path.join(out, f"{stage}.pt")) else []
    run(stage, *argv, "--out", out, *resume, lapo_py=lapo_py)


def piece(out, stage, argv):
    piece_cmd(os.path.join(ROOT, "lapo.py"), out, stage, argv)


def decoder_accuracy(root, seed):
    """Held-out decoder accuracy (stage 3 offline's windows, fit and init) with and without --decoder-std."""
    path = os.path.join(root, f"paper-s{seed}", "decoder_std.json")
    if os.path.exists(path):
        return read_json(path)
    out, data = os.path.join(root, f"paper-s{seed}"), os.path.join(root, "data", "starpilot")
    train, test = lapo.load_split(data, "train"), lapo.load_split(data, "test")
    policy, _ = lapo.load_stage2(out, torch.device("cpu"))
    amp = lapo.bf16_fast(torch.device("cpu"))  # as the small preset's --amp auto
    test_c = lapo.heldout_centres(test)
    test_pi, test_y = lapo.policy_latents(policy, test.obs[test_c], "cpu", amp), test.labels(test_c)
    perm = torch.randperm(len(train.centres), generator=torch.Generator().manual_seed(seed))
    result = {}
    for n in LABELS:
        c = train.centres[perm[:n]]
        z, y = lapo.policy_latents(policy, train.obs[c], "cpu", amp), train.labels(c)
        for std in (0, 1):
            torch.manual_seed(seed + n)
            dec = lapo.fit_decoder(lapo.Decoder(), z, y, DECODER_STEPS, seed + n, std)
            result[f"std{std}_{n}"] = lapo.accuracy(dec, test_pi, test_y, "cpu")
    lapo.write_json(path, result)
    return result


def report(root):
    rows, probe = [], {}
    for name in CONFIGS:
        probe[name] = {s: (read_json(os.path.join(root, f"{name}-s{s}", "stage1_summary.json")) or {})
                       .get("probe_acc") for s in SEEDS}
    for name in CONFIGS:
        v = probe[name]
        st = stats(v.values())
        d = [v[s] - probe["paper"][s] for s in SEEDS if v[s] is not None and probe["paper"][s] is not None]
        ds = stats(d)
        rows.append({"config": name, "per_seed": v, **st, "diff_vs_paper": ds})
        print(f"{name:14s} probe {st['mean']} ± {st['se']} (n={st['n']}) | per seed {list(v.values())} | "
              f"paired diff vs paper {ds['mean']} ± {ds['se']} (n={ds['n']})")
    dec = {s: read_json(os.path.join(root, f"paper-s{s}", "decoder_std.json")) for s in SEEDS}
    dec = {s: d for s, d in dec.items() if d}
    for n in LABELS:
        a = {std: [d[f"std{std}_{n}"] for d in dec.values()] for std in (0, 1)}
        diff = stats([x1 - x0 for x0, x1 in zip(a[0], a[1])])
        print(f"decoder {n:5d} labels: std0 {stats(a[0])} | std1 {stats(a[1])} | paired std1-std0 {diff}")
        rows.append({"decoder_labels": n, "std0": a[0], "std1": a[1], "diff": diff})
    lapo.write_json(os.path.join(root, "report.json"), rows)


def main():
    root = sys.argv[1]
    if "--report" in sys.argv:
        return report(root)
    data = os.path.join(root, "data")
    if not os.path.exists(os.path.join(data, "starpilot", "collect_summary.json")):
        run("collect", "--env", "starpilot", "--policy", "random", "--preset", "small", "--out", data)
    common = ["--preset", "small", "--data", os.path.join(data, "starpilot")]
    for seed in SEEDS:
        for name, flags in CONFIGS.items():
            piece(os.path.join(root, f"{name}-s{seed}"), "stage1", [*common, "--seed", str(seed), *BASE, *flags])
        piece(os.path.join(root, f"paper-s{seed}"), "stage2", [*common, "--seed", str(seed)])
        print(json.dumps(decoder_accuracy(root, seed)), flush=True)
    report(root)


if __name__ == "__main__":
    main()
