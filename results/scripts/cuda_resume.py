"""Does `--resume` continue stages 1 and 2 exactly on CUDA, as the suite checks on the CPU? For each stage at `tiny`:
two uninterrupted runs with the same seed (is a run repeatable at all?), and one killed right after its first
checkpoint and resumed; prints the largest weight difference of each against the first run.

    python results/scripts/cuda_resume.py DATA_ROOT/GAME OUT [--device cuda] [--torch-deterministic 0]

e.g. on `python lapo.py collect --preset tiny --env bigfish --out DATA_ROOT`. Measured on an H200 (2026-12-04, before
lapo had --torch-deterministic, so with CUDA's default kernels and no CUBLAS_WORKSPACE_CONFIG): stage 1 differed by up
to 0.014 in its weights between two runs, and a resumed one by 0.011; stage 2 was bit-exact. With
torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG=:4096:8 (now lapo's default on CUDA) all four
were bit-exact. lapo sets the variable with --torch-deterministic 0 too, so 0 is not quite the measured default.
"""
import argparse
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import lapo  # noqa: E402


def run(stage, data, out, device, det, kill_at=None, resume=False):
    """One run of `stage` (30 steps, a checkpoint every 10) -> its returned modules' state dicts."""
    argv = [stage, "--preset", "tiny", "--data", data, "--out", out, "--device", device, f"--{stage}-steps", "30",
            "--ckpt-every", "10", "--eval-every", "15", "--torch-deterministic", det, *(["--resume"] if resume else [])]
    real = lapo.save_atomic

    def save(obj, path):  # as a run killed right after writing its step-`kill_at` checkpoint
        real(obj, path)
        if obj.get("step") == kill_at:
            raise KeyboardInterrupt
    lapo.save_atomic = save
    try:
        modules = getattr(lapo, stage)(lapo.parse_args(argv))
    except KeyboardInterrupt:
        return None
    finally:
        lapo.save_atomic = real
    return [m.state_dict() for m in modules if isinstance(m, torch.nn.Module)]


def largest_diff(a, b):
    return max((x.float() - y.float()).abs().max().item() for sa, sb in zip(a, b) for x, y in
               zip(sa.values(), sb.values()) if x.is_floating_point())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--torch-deterministic", default="1", choices=("0", "1"))
    a = ap.parse_args()
    if os.path.exists(a.out):
        sys.exit(f"{a.out} exists; give a new folder")
    for stage in ("stage1", "stage2"):
        runs = {}
        for name in ("first", "again", "killed"):
            out = os.path.join(a.out, name)
            if stage == "stage2" and name != "first":  # every stage-2 run on the first run's stage 1
                shutil.copy(os.path.join(a.out, "first", "stage1.pt"), out)
            runs[name] = run(stage, a.data, out, a.device, a.torch_deterministic, 10 if name == "killed" else None)
        runs["killed"] = run(stage, a.data, os.path.join(a.out, "killed"), a.device, a.torch_deterministic, None, True)
        for name in ("again", "killed"):
            d = largest_diff(runs["first"], runs[name])
            print(f"{stage} on {a.device}: {'a second run' if name == 'again' else 'killed at step 10, resumed'} "
                  f"-> largest weight difference from the first run {d:.3g} ({'bit-exact' if d == 0 else 'not exact'})",
                  flush=True)


if __name__ == "__main__":
    main()
