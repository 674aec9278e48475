"""Issue 36: how much of the held-out action the fork's own action head reads (examples/few_labels.py saves it in
stage1.pt as "head"), on stage 1's probe windows of the test split, against the most frequent action's share.

    python results/scripts/head_acc.py RUN DATA      # RUN: a fork's run folder, DATA: its data folder
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import lapo  # noqa: E402

run, data = sys.argv[1], sys.argv[2]
cpu = torch.device("cpu")
torch.set_num_threads(1)
idm, ck = lapo.load_stage1(run, cpu)
head = torch.nn.Linear(ck["config"]["latent_dim"], lapo.NUM_ACTIONS)
head.load_state_dict(ck["head"])  # (load_stage1 returns the whole checkpoint)
test = lapo.load_split(data, "test")
_, centres = lapo.stage1_test_windows(argparse.Namespace(**ck["config"]), test)
z, y = lapo.idm_latents(idm, test, centres, cpu, False), test.labels(centres)
with torch.no_grad():
    pred = head(F.layer_norm(z, z.shape[-1:])).argmax(-1)  # the fork's head reads the layer-normed latent
print(f"{run}: head acc {(pred == y).float().mean().item():.3f}, most frequent action "
      f"{torch.bincount(y).max().item() / len(y):.3f} ({len(y)} windows)")
