"""A uniformly random policy under this project's evaluation protocol (the first full episode of each of 64 envs,
repeated until N episodes; evaluation seed as `eval --seed S` uses), to set beside the REFERENCE table's random
returns, which come from the authors' data.

    python results/scripts/random_eval.py dodgeball 512 0
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import lapo  # noqa: E402


class RandomAgent:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def to(self, device):  # the interface evaluate_policy uses
        return self

    def eval(self):
        return self

    def act(self, obs, sample=True, amp=False):
        return self.rng.integers(0, lapo.NUM_ACTIONS, len(obs)), np.zeros(len(obs), np.float32)


def main(game, episodes, seed):
    lapo.check_game(game)
    rets = lapo.evaluate_policy(RandomAgent(seed + 20_000), game, episodes, seed + 20_000, torch.device("cpu"))
    se = np.std(rets, ddof=1) / np.sqrt(len(rets))
    print(f"random policy on {game}: return {np.mean(rets):.3f} ± {se:.3f} (SE) over {len(rets)} episodes; "
          f"REFERENCE table: {lapo.SCORES[game][0]}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: random_eval.py GAME EPISODES SEED")
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
