"""Every test of test_lapo.py that asserts a learned quantity, run over many seeds: the seed of the training run
and, where the test makes its own synthetic video, the video's seed (both = the seed here). Each test's threshold
comes from the worst of these seeds, with margin (issue 32). Runs exactly the test's own code (its runner function
in test_lapo.py), in fp32 (`tiny` runs --amp off).

    python results/scripts/test_seeds.py OUT.jsonl [--seeds 0-7] [--only CASE,...]   # appends; skips done runs
    python results/scripts/test_seeds.py OUT.jsonl --report                        # min / mean / max per case

Each line of OUT.jsonl is one (case, seed) with its metrics and this host's CPU.
"""
import argparse
import json
import pathlib
import os
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
import test_lapo as T  # noqa: E402


def stage1_case(*flags):
    def run(tmp, seed):
        acc0, s = T.stage1_from_video_alone(tmp, seed, *flags)
        return {"probe_acc": s["probe_acc"], "untrained_acc": acc0, "majority": s["probe_majority"]}
    return run


def knob_case(**knobs):
    """stage1_tiny with a VQ knob of results/scripts/vq_knobs.py (issue 34), e.g. vq_restart=0.1."""
    def run(tmp, seed):
        import vq_knobs  # (its VQ replaces lapo's; with every knob at 0 it is lapo's)
        vq_knobs.KNOBS.update(knobs)
        try:
            return stage1_case()(tmp, seed)
        finally:
            vq_knobs.KNOBS.update(vq_restart=0.0, vq_count_init=0.0)
    return run


def offline(tmp, seed, stage2_lr=2e-3):
    s2, row, majority = T.offline_decoding_run(tmp, seed, stage2_lr)
    return {"s2_loss_ratio": s2["test_loss"] / s2["test_loss_mean_baseline"], "test_acc": row["test_acc"],
            "majority": majority, "acc_over_majority": row["test_acc"] - majority}


def supervised(tmp, seed):
    s = T.supervised_idm_run(tmp, seed)[0]
    return {"test_acc": s["test_acc"], "probe_acc": s["probe_acc"], "majority": s["probe_majority"]}


def collapsed(tmp, seed):
    entropy, change = T.collapsed_latent_decoder(seed)
    return {"min_entropy": entropy, "max_change": change}


def few_labels(labels, *flags, steps=200, batch=16):
    def run(tmp, seed):
        s = T.few_labels_run(tmp, seed, labels, *flags, steps=steps, batch=batch)[0]
        return {"probe_acc": s["probe_acc"], "majority": s["probe_majority"]}
    return run


CASES = {"collapsed_decoder": collapsed, "supervised_idm": supervised, "offline_decoding": offline,
         "offline_decoding_untrained_policy": lambda tmp, seed: offline(tmp, seed, 1e-9),
         "stage1_paper_fdm": stage1_case("--fdm-residual", 0), "stage1_tiny": stage1_case(),
         "stage1_tiny_vq_restart": knob_case(vq_restart=0.1), "stage1_tiny_vq_count1": knob_case(vq_count_init=1.0),
         "stage1_tiny_vq_decay_0.99": stage1_case("--vq-decay", 0.99), "stage1_tiny_commit_0.25":
         stage1_case("--commit-weight", 0.25), "stage1_tiny_lr_3e-4": stage1_case("--lr", 3e-4),
         "few_labels_plain": few_labels(0), "few_labels_1024": few_labels(1024),
         "few_labels_plain_100": few_labels(0, steps=100), "few_labels_1024_100": few_labels(1024, steps=100),
         "few_labels_plain_b8": few_labels(0, batch=8),
         "few_labels_1024_b8": few_labels(1024, "--label-batch", 8, batch=8)}


def cpu():
    info = {}
    for line in open("/proc/cpuinfo"):
        k, _, v = line.partition(":")
        info.setdefault(k.strip(), v.strip())
    flags = set(info.get("flags", "").split())
    amx, bf16 = "amx_bf16" in flags, "avx512_bf16" in flags
    return (f"{info.get('model name')} (family {info.get('cpu family')}, model {info.get('model')}; "
            f"{'' if amx else 'no '}AMX, {'' if bf16 else 'no '}AVX-512 BF16)")


def seeds(text):
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def report(path):
    rows = [json.loads(ln) for ln in open(path)]
    print("| case | metric | seeds | min | mean | max | CPU |\n|---|---|---|---|---|---|---|")
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case]
        for m in rs[0]["metrics"]:
            v = [r["metrics"][m] for r in rs]
            worst = min(range(len(v)), key=v.__getitem__)
            print(f"| {case} | {m} | {len(v)} | {min(v):.3f} (seed {rs[worst]['seed']}) | {sum(v) / len(v):.3f} | "
                  f"{max(v):.3f} | {'; '.join(sorted({r['cpu'] for r in rs}))} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seeds", type=seeds, default=seeds("0-7"))
    ap.add_argument("--only", default=",".join(CASES))
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    if a.report:
        return report(a.out)
    done = {(r["case"], r["seed"]) for r in map(json.loads, open(a.out))} if os.path.exists(a.out) else set()
    for case in a.only.split(","):
        for seed in a.seeds:
            if (case, seed) in done:
                continue
            t = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                metrics = CASES[case](pathlib.Path(tmp), seed)
            row = {"case": case, "seed": seed, "metrics": metrics, "cpu": cpu(), "threads": T.torch.get_num_threads(),
                   "wall_s": round(time.time() - t, 1)}
            print(json.dumps(row), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
