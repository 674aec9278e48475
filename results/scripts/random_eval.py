"""Frame-blind baselines under this project's evaluation protocol (the first full episode of each of 64 envs,
repeated until N episodes; evaluation seed as `eval --seed S` uses): a uniformly random policy, and, given a data
folder, the "marginal" policy that samples each action at its frequency in the data's train split, ignoring the
frame. An offline decoder fed a latent that carries nothing acts like the marginal policy of its labels, so a
decoded policy must beat this to show that its latents carry information.

    python results/scripts/random_eval.py dodgeball 512 0 runs/small-dodgeball/data/dodgeball
"""
import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
import lapo  # noqa: E402
from pipeline import action_frequencies, evaluate_frame_blind  # noqa: E402  (the pipeline's own)


def main(game, episodes, seed, data=None):
    lapo.check_game(game)
    policies = {"random": np.full(lapo.NUM_ACTIONS, 1 / lapo.NUM_ACTIONS)}
    if data:
        policies["marginal"] = action_frequencies(data)
        if policies["marginal"] is None:
            sys.exit(f"{data}: no train chunks with actions (ta)")
        print(f"{data}: train action frequencies " + ", ".join(
            f"{n} {p:.3f}" for n, p in zip(lapo.ACTION_NAMES, policies["marginal"])))
    for name, probs in policies.items():
        r = evaluate_frame_blind(probs, game, episodes, seed)
        print(f"{name} policy on {game}: return {r['mean']:.3f} ± {r['se']:.3f} (SE) over {r['episodes']} episodes"
              + (f"; REFERENCE table's random: {lapo.SCORES[game][0]}" if name == "random" else ""), flush=True)


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit("usage: random_eval.py GAME EPISODES SEED [DATA_FOLDER]")
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
