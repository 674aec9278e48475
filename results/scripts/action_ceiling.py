"""How much of the expert's action can a policy read from one frame o_t at all? BC from scratch on *every*
labeled train frame (stage 3's BC: IMPALA at stage 2's width, Adam 5e-4, batch 64, label smoothing 0.05), with
its held-out accuracy on stage 3's 2,048 test frames and its return in the env. Any policy of o_t alone, LAPO's
decoded latent policy included, is bounded by what the frame says about the action; this measures that bound
at the data's own scale (with `decoder_diag.py` at the same label count for the latent policy).

    python results/scripts/action_ceiling.py runs/small-starpilot-t05/data/starpilot 2000 512 0 1 2

Arguments: data folder, BC steps, evaluation episodes, seeds. "Every frame" means every frame that centres a
stage-1 window (the frames stage 3 draws its labels from). 2,000 steps (stage 2's budget) and 512 episodes take
about 4 minutes per seed on 2 CPU cores.
"""
import os
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import lapo  # noqa: E402
from pipeline import fmt_stats  # noqa: E402


def bc_all(data, steps, episodes, seed, scale=1.0):
    train, test = lapo.load_split(data, "train"), lapo.load_split(data, "test")
    tc = lapo.heldout_centres(test)
    c = train.centres
    torch.manual_seed(seed)
    bc = lapo.ImpalaAgent(scale)
    t0 = time.time()
    lapo.train_classifier(bc, train.obs[c.cpu()], train.labels(c), steps, 64, 5e-4, seed)
    train_s = time.time() - t0
    acc = lapo.accuracy(bc, test.obs[tc.cpu()], test.labels(tc), "cpu")
    torch.manual_seed(seed + 20_000)  # stage 3's evaluation seeds
    rets = lapo.evaluate_policy(bc, train.game, episodes, seed + 20_000, torch.device("cpu"), amp=True)
    ret = sum(rets) / len(rets)
    print(f"seed {seed}: {len(c)} labels, {steps} steps in {train_s:.0f}s ({steps * 64 / train_s:.0f} samples/s): "
          f"held-out accuracy {acc:.3f}, return {ret:.2f} over {len(rets)} episodes", flush=True)
    return acc, ret


def main(data, steps, episodes, seeds):
    res = [bc_all(data, steps, episodes, s) for s in seeds]
    print(f"\n{data}, BC from scratch on every labeled train frame, {steps} steps, seeds {seeds}:")
    print(f"held-out accuracy {fmt_stats([r[0] for r in res])}, return {fmt_stats([r[1] for r in res])}")


if __name__ == "__main__":
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [int(s) for s in sys.argv[4:]])
