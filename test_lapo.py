"""Tests for lapo.py: units (VQ, windows, FDM, PPO pieces), a functional test that LAPO recovers actions from
video alone, and tiny end-to-end runs of every subcommand on real Procgen frames. Run: pytest -q"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lapo

HERE = os.path.dirname(os.path.abspath(__file__))


def run_cli(*argv, ok=True):
    r = subprocess.run([sys.executable, os.path.join(HERE, "lapo.py"), *map(str, argv)],
                       capture_output=True, text=True, timeout=600)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def last_json(stdout):
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])


# ---------------------------------------------------------------------------------------------- VQ
def test_vq_shapes_indices_and_codes():
    torch.manual_seed(0)
    vq = lapo.VectorQuantizer(128, 16, 2, 64).eval()
    z = torch.randn(5, 128) * 0.05
    zq, commit, codes, ppl = vq(z)
    assert zq.shape == (5, 128) and codes.shape == (5, 8) and commit.shape == ()
    assert codes.min() >= 0 and codes.max() < 64
    # every quantized 16-d vector is exactly its code: vectors 0-3 from codebook 0, vectors 4-7 from codebook 1
    vecs = zq.view(5, 8, 16)
    for v in range(8):
        book = vq.codebook[v // 4]
        assert torch.allclose(vecs[:, v], book[codes[:, v]], atol=1e-6)
    # and it is the nearest code
    d = torch.cdist(z.view(5, 8, 16)[:, 0], vq.codebook[0])
    assert torch.equal(d.argmin(-1), codes[:, 0])


def test_straight_through_gradient_reaches_idm_and_codebook_gets_none():
    idm = lapo.IDM(scale=0.25)
    w = torch.randint(0, 256, (4, 3, 64, 64, 3), dtype=torch.uint8)
    out = idm(w)
    (out["zq"].pow(2).sum() + out["commit"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in idm.encoder.parameters())
    assert not any(b.requires_grad for b in idm.vq.buffers())  # codes move by EMA only


def test_ema_codebook_moves_in_train_mode_only():
    vq = lapo.VectorQuantizer(decay=0.9)
    z = torch.randn(64, 128)
    before = vq.codebook.clone()
    vq.eval()
    vq(z)
    assert torch.equal(vq.codebook, before)
    vq.train()
    vq(z)
    assert not torch.equal(vq.codebook, before)
    # a code that receives latents moves toward their mean
    vq2 = lapo.VectorQuantizer(decay=0.5).train()
    target = torch.full((1, 16), 0.3)
    z = target.repeat(32, 8)  # every vector of every sample is the same point
    for _ in range(30):
        _, _, codes, _ = vq2(z)
    code = codes[0, 0]
    assert torch.allclose(vq2.codebook[0, code], target[0], atol=1e-3)


def test_perplexity_counts_codes_in_use():
    vq = lapo.VectorQuantizer(128, 16, 2, 64).eval()
    z = vq.codebook[0, :1].repeat(4, 8)  # all vectors at code 0 of book 0 -> one code per book
    assert vq(z)[3].item() == pytest.approx(1.0, abs=1e-4)
    # 8 samples, each using its own code in both books (4 vectors each) -> 8 codes equally used
    z = torch.stack([torch.cat([vq.codebook[0, i].repeat(4), vq.codebook[1, i].repeat(4)]) for i in range(8)])
    assert vq(z)[3].item() == pytest.approx(8.0, rel=1e-3)


def test_no_vq_ablation_passes_continuous_latent():
    idm = lapo.IDM(scale=0.25, vq=False)
    out = idm(torch.randint(0, 256, (2, 3, 64, 64, 3), dtype=torch.uint8))
    assert torch.equal(out["z"], out["zq"]) and out["commit"].item() == 0


# ---------------------------------------------------------------------------------------------- FDM
def test_tiled_latent_conv_equals_concat_then_conv():
    torch.manual_seed(0)
    m = lapo.TiledLatentConv(128, 8)
    z, x = torch.randn(3, 128), torch.randn(3, 6, 64, 64)
    wx = torch.randn(8, 6, 3, 3) * 0.1
    ref = F.conv2d(torch.cat([x, z[:, :, None, None].expand(-1, -1, 64, 64)], 1), torch.cat([wx, m.weight], 1),
                   padding=1)
    assert torch.allclose(F.conv2d(x, wx, padding=1) + m(z), ref, atol=1e-4)


def test_fdm_output_shape_and_range():
    fdm = lapo.FDM(128, 4)
    y = fdm(torch.randint(0, 256, (2, 2, 64, 64, 3), dtype=torch.uint8), torch.randn(2, 128))
    assert y.shape == (2, 3, 64, 64) and y.abs().max() <= 0.5


# ---------------------------------------------------------------------------------------------- data
def episode_frames(lengths):
    """Frames whose pixels encode (episode id, step) so windows can be checked."""
    ep = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
    step = np.concatenate([np.arange(n) for n in lengths])
    obs = np.zeros((len(ep), 64, 64, 3), np.uint8)
    obs[:, 0, 0, 0], obs[:, 0, 0, 1] = ep, step
    done = np.zeros(len(ep), bool)
    done[np.cumsum(lengths) - 1] = True
    return obs, done


def test_windows_never_cross_episode_or_chunk_boundaries():
    obs, done = episode_frames([5, 1, 2, 3, 40, 7])
    data = lapo.FrameData(obs, done, chunk_ends=[30])  # a chunk boundary inside episode 4 (frames 11..50)
    w = data.windows(data.sample(5000, torch.Generator().manual_seed(0)), "cpu").numpy()
    ep, step = w[:, :, 0, 0, 0], w[:, :, 0, 0, 1]
    assert (ep == ep[:, :1]).all(), "a window crosses an episode boundary"
    assert (np.diff(step.astype(int), axis=1) == 1).all(), "window frames are not consecutive"
    centres = set(data.centres.tolist())
    assert 30 not in centres and 31 not in centres  # no window spans frames 30 -> 31
    # episodes of length 1 and 2 have no window; every other interior frame does
    expected = sum(max(0, n - 2) for n in [5, 1, 2, 3, 40, 7]) - 2
    assert len(centres) == expected


def write_chunk(path, n, with_ta=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"obs": rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8), "done": rng.random(n) < 0.05,
              "rewards": np.zeros(n, np.float32), "ep_returns": np.zeros(n, np.float32),
              "values": np.zeros(n, np.float32)}
    if with_ta:
        arrays["ta"] = rng.integers(0, 15, n)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def test_load_split_is_one_contiguous_uint8_array(tmp_path):
    a = write_chunk(str(tmp_path / "g/train/0.npz"), 100, seed=0)
    b = write_chunk(str(tmp_path / "g/train/1.npz"), 60, seed=1)
    write_chunk(str(tmp_path / "g/train/10.npz"), 30, seed=2)  # integer order: 0, 1, 10
    data = lapo.load_split(str(tmp_path / "g"), "train", max_chunks=2)
    assert data.obs.dtype == torch.uint8 and data.obs.shape == (160, 64, 64, 3) and data.obs.is_contiguous()
    assert np.array_equal(data.obs[:100].numpy(), a["obs"]) and np.array_equal(data.obs[100:].numpy(), b["obs"])
    assert np.array_equal(data.ta.numpy(), np.concatenate([a["ta"], b["ta"]]))
    assert data.obs.untyped_storage().nbytes() == 160 * 64 * 64 * 3  # no copies beyond the raw frames


def test_bad_data_gives_one_line_errors(tmp_path):
    with pytest.raises(lapo.LapoError, match="not found"):
        lapo.load_split(str(tmp_path / "missing"), "train")
    os.makedirs(tmp_path / "empty/train")
    with pytest.raises(lapo.LapoError, match="no train chunks"):
        lapo.load_split(str(tmp_path / "empty"), "train")
    os.makedirs(tmp_path / "bad/train")
    (tmp_path / "bad/train/0.npz").write_bytes(b"not a zip file")
    with pytest.raises(lapo.LapoError, match="corrupt"):
        lapo.load_split(str(tmp_path / "bad"), "train")
    os.makedirs(tmp_path / "shape/train")
    np.savez(tmp_path / "shape/train/0.npz", obs=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(lapo.LapoError, match=r"\(N, 64, 64, 3\)"):
        lapo.load_split(str(tmp_path / "shape"), "train")
    with pytest.raises(lapo.LapoError, match="unknown game"):
        lapo.check_game("pong")


# ---------------------------------------------------------------------------------------------- functional
def moving_square_video(n_frames, seed, ep_len=64, shift=4):
    """Synthetic video with known actions: each episode shows a random blocky texture (64x64, 8x8 blocks) that
    one of 5 actions (noop, left, right, up, down) pans by `shift` px with wrap-around, like a camera moved
    by the player. ta[t] is the action that turns obs[t] into obs[t+1]."""
    rng = np.random.default_rng(seed)
    moves = np.array([[0, 0], [0, -shift], [0, shift], [-shift, 0], [shift, 0]])
    ta = rng.integers(0, 5, n_frames)
    obs = np.zeros((n_frames, 64, 64, 3), np.uint8)
    for t in range(n_frames):
        if t % ep_len == 0:
            frame = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        else:
            frame = np.roll(frame, moves[ta[t - 1]], axis=(0, 1))
        obs[t] = frame
    done = np.zeros(n_frames, bool)
    done[ep_len - 1::ep_len] = True
    return obs, done, ta


def test_stage1_recovers_actions_from_video_alone(tmp_path):
    """The method works: trained without actions, the IDM's latents predict the true action on held-out
    windows far above chance (5 equally likely actions: 20%, majority ~20%)."""
    obs, done, ta = moving_square_video(6144, seed=0)
    train = lapo.FrameData(obs[:4096], done[:4096], None)  # no actions at all for training
    test = lapo.FrameData(obs[4096:], done[4096:], ta[4096:])
    args = lapo.parse_args(["stage1", "--preset", "tiny", "--data", "unused", "--out", str(tmp_path),
                            "--stage1-steps", "300", "--batch-size", "32", "--eval-every", "300",
                            "--probe-windows", "1024", "--log-every", "100", "--vq-decay", "0.9", "--lr", "1e-3",
                            "--idm-diff", "0", "--fdm-residual", "0"])  # the paper's IDM input and FDM output
    _, _, summary = lapo.stage1(args, train, test)
    # measured: probe_acc 0.959 with bf16 autocast, 0.979 in fp32 (majority 0.211), 31 s of training on 2 CPU cores
    assert summary["probe_majority"] < 0.3
    assert summary["probe_acc"] > 0.6, summary


# ---------------------------------------------------------------------------------------------- resume
def test_resume_continues_exactly_and_config_mismatch_is_refused(tmp_path, monkeypatch):
    obs, done, ta = moving_square_video(1024, seed=1)
    train, test = lapo.FrameData(obs[:768], done[:768], None), lapo.FrameData(obs[768:], done[768:], ta[768:])
    base = ["stage1", "--preset", "tiny", "--data", "unused", "--stage1-steps", "8", "--eval-every", "4",
            "--ckpt-every", "4", "--probe-windows", "64", "--log-every", "4"]
    idm_full, fdm_full, _ = lapo.stage1(lapo.parse_args(base + ["--out", str(tmp_path / "a")]), train, test)

    real_save = lapo.save_atomic

    def save_then_crash(obj, path):  # the process dies right after the step-4 checkpoint
        real_save(obj, path)
        if obj.get("step") == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(lapo, "save_atomic", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        lapo.stage1(lapo.parse_args(base + ["--out", str(tmp_path / "b")]), train, test)
    monkeypatch.setattr(lapo, "save_atomic", real_save)
    assert not os.path.exists(tmp_path / "b/stage1.pt.tmp")
    idm_res, fdm_res, s = lapo.stage1(lapo.parse_args(base + ["--out", str(tmp_path / "b"), "--resume"]), train, test)
    assert s["step"] == 8
    for full, res in ((idm_full, idm_res), (fdm_full, fdm_res)):
        for (k, a), b in zip(full.state_dict().items(), res.state_dict().values()):
            assert torch.equal(a, b), k
    with pytest.raises(lapo.LapoError, match="already exists"):
        lapo.stage1(lapo.parse_args(base + ["--out", str(tmp_path / "b")]), train, test)
    with pytest.raises(lapo.LapoError, match="different configuration"):
        lapo.stage1(lapo.parse_args(base + ["--out", str(tmp_path / "b"), "--resume", "--fdm-width", "8"]), train, test)


# ---------------------------------------------------------------------------------------------- PPO pieces
def test_gae_matches_hand_computation():
    r = torch.tensor([[1.0], [0.0], [2.0]])
    v = torch.tensor([[0.5], [1.0], [1.5]])
    d = torch.tensor([[0.0], [1.0], [0.0]])  # the episode ends with step 1
    nv, g, lam = torch.tensor([3.0]), 0.9, 0.8
    d2 = 2.0 + g * 3.0 - 1.5                   # step 2 bootstraps from next_value
    d1 = 0.0 - 1.0                             # step 1: terminal, no bootstrap
    d0 = 1.0 + g * 1.0 - 0.5
    a2, a1 = d2, d1
    a0 = d0 + g * lam * a1
    adv, ret = lapo.gae(r, v, d, nv, g, lam)
    assert torch.allclose(adv[:, 0], torch.tensor([a0, a1, a2]))
    assert torch.allclose(ret, adv + v)


def test_reward_normalizer_tracks_return_variance():
    norm = lapo.RewardNormalizer(num_envs=2, gamma=0.5)
    rng = np.random.default_rng(0)
    rets, ret = [], np.zeros(2)
    for t in range(500):
        r, d = rng.normal(size=2), rng.random(2) < 0.1
        ret = ret * 0.5 + r
        rets.append(ret.copy())
        ret[d] = 0
        out = norm(r, d)
    assert norm.var == pytest.approx(np.var(np.concatenate(rets)), rel=0.02)
    assert np.allclose(out, np.clip(r / np.sqrt(norm.var + 1e-8), -10, 10), atol=1e-6)


def test_online_agent_starts_as_decoded_latent_policy():
    torch.manual_seed(0)
    agent = lapo.OnlineAgent(scale=0.25)
    obs = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8)
    logits, value = agent(obs)
    decoded = agent.decoder(agent.policy(lapo.preprocess(obs)))
    # the RL head is zero, so the logits are exactly the decoded latent policy's (halved by the averaging)
    assert torch.allclose(logits, decoded / 2, atol=1e-6)
    assert torch.equal(logits.argmax(-1), decoded.argmax(-1))


def test_ppo_update_trains_heads_and_leaves_frozen_latent_policy_alone(tmp_path):
    """One real PPO update (Procgen, tiny) on the RL+SL policy: the frozen latent policy and, with SL, the decoder
    (trained only by supervision) do not move; the RL head, the copied 256-unit layer and the value head do."""
    torch.manual_seed(0)
    agent = lapo.OnlineAgent(scale=0.25)
    args = lapo.parse_args(["stage3", "--mode", "online", "--preset", "tiny", "--out", str(tmp_path),
                            "--frames", "256", "--num-envs", "4", "--num-steps", "64"])
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    const = lambda frames: 1e-3  # noqa: E731
    groups = [("rl_head", list(agent.rl_head.parameters()), const), ("value", list(agent.value.parameters()), const),
              ("fc_copy", list(agent.fc.parameters()), const)]
    curve = lapo.ppo(args, agent, groups, "online", "bigfish")
    assert len(curve) == 1 and curve[0]["frames"] == 256
    after = agent.state_dict()
    for k, v in before.items():
        moved = not torch.equal(v, after[k])
        assert moved == k.startswith(("rl_head.", "value.", "fc.")), k


def test_decoder_standardizes_its_input():
    """Latents are tiny (std ~0.02); the decoder fit on them sees standardized inputs, so the latents' scale is moot."""
    torch.manual_seed(0)
    z = torch.randn(256, 128) * 0.02 + 0.01
    dec = lapo.Decoder().fit_input(z)
    scaled = lapo.Decoder()
    scaled.load_state_dict(dec.state_dict())
    scaled.fit_input(z * 50)
    assert torch.allclose(dec(z), scaled(z * 50), atol=1e-5)
    x = (z - dec.mean) / dec.std
    assert torch.allclose(x.mean(0), torch.zeros(128), atol=1e-5) and torch.allclose(x.std(0), torch.ones(128), atol=1e-3)


def test_decoder_schedule():
    due = [u for u in range(200) if lapo.decoder_due(u, (u + 1) * 4096)]
    assert due[0] == 2 and all(u in due for u in range(2, 12))  # every update from 10k to 50k frames
    assert 12 not in due and 20 in due and 40 in due and 60 in due and 21 not in due  # then every 20th
    assert max(due) * 4096 <= 400_000


def test_window_pairs_of_a_rollout_respect_episode_ends():
    T, E = 5, 2
    obs = torch.arange(T + 1)[:, None, None, None, None].expand(T + 1, E, 64, 64, 3).to(torch.uint8).clone()
    obs[:, 1] += 100
    dones = torch.zeros(T, E, dtype=torch.bool)
    dones[2, 0] = True  # env 0's episode ends with step 2: o_3 starts a new one
    prev = {"obs": torch.full((E, 64, 64, 3), 200, dtype=torch.uint8), "done": torch.tensor([False, True])}
    actions = torch.arange(T * E).view(T, E)
    win, act = lapo.window_pairs(obs, actions, dones, prev)
    frames = win[:, :, 0, 0, 0].tolist()
    # env 0: t=0 (prev,0,1), t=1 (0,1,2); t=2 crosses the end, t=3 starts after it; t=4 (3,4,5)
    assert [200, 0, 1] in frames and [0, 1, 2] in frames and [3, 4, 5] in frames
    assert [1, 2, 3] not in frames and [2, 3, 4] not in frames
    # env 1: prev frame is from a finished episode, so t=0 is excluded
    assert [200, 100, 101] not in frames and [100, 101, 102] in frames
    assert len(act) == 3 + 4


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The tiny pipeline on real Procgen through the CLI: expert -> collect -> stage1 -> stage2 -> stage3 offline
    (+ BC) -> stage3 online (+ PPO from scratch, + no-SL) -> results.md and plots."""
    root = tmp_path_factory.mktemp("e2e")
    r = run_cli("pipeline", "--env", "bigfish", "--preset", "tiny", "--out", root, "--ablations")
    return root, root / "lapo", r.stdout


def test_collect_writes_the_authors_layout(pipeline):
    root = pipeline[0]
    with np.load(root / "data/bigfish/train/0.npz") as z:
        assert z["obs"].dtype == np.uint8 and z["obs"].shape == (2048, 64, 64, 3)
        assert z["ta"].shape == (2048,) and 0 <= z["ta"].min() and z["ta"].max() < 15
        assert z["done"].dtype == bool and z["done"].reshape(8, 256)[:, -1].all()  # segment ends are marked
        for k in ("rewards", "ep_returns", "values"):
            assert z[k].shape == (2048,)
        assert np.isfinite(z["values"]).all() and np.abs(z["values"]).sum() > 0  # the expert's value head
        # consecutive frames inside an env segment are real transitions: mostly small pixel changes
        seg, seg_done = z["obs"][:256].astype(int), z["done"][:256]
        diffs = [np.abs(seg[t + 1] - seg[t]).mean() for t in range(255) if not seg_done[t]]
        assert np.median(diffs) < 10
    assert os.path.exists(root / "data/bigfish/test/0.npz")
    summary = json.load(open(root / "data/bigfish/collect_summary.json"))
    assert summary["train"]["frames"] == 2048 and summary["test"]["frames"] == 1024


def test_stage1_and_stage2_cli_summaries(pipeline):
    run = pipeline[1]
    s1, s2 = json.load(open(run / "stage1_summary.json")), json.load(open(run / "stage2_summary.json"))
    assert s1["step"] == 30 and 0 <= s1["probe_acc"] <= 1 and s1["test_fdm_loss"] > 0
    assert s2["step"] == 30 and s2["test_loss"] > 0
    lines = [json.loads(ln) for ln in open(run / "metrics.jsonl")]
    assert any("stage1/samples_per_s" in ln for ln in lines) and any("stage2/test_loss" in ln for ln in lines)


def test_stage3_offline_online_and_eval_cli(pipeline):
    root, run = pipeline[0], pipeline[1]
    off = json.load(open(run / "stage3_offline_summary.json"))
    assert {(r["method"], r["labels"]) for r in off["results"]} == {("lapo", 16), ("lapo", 64), ("bc", 16), ("bc", 64)}
    on, nosl = json.load(open(run / "stage3_online_summary.json")), json.load(open(run / "stage3_online_nosl_summary.json"))
    assert on["frames"] == 2048 and on["sl"] is True and nosl["sl"] is False
    curve = [json.loads(ln) for ln in open(run / "metrics.jsonl") if '"online"' in ln]
    assert any("online/decoder_pairs" in c for c in curve)  # the decoder was retrained on IDM labels
    assert json.load(open(root / "ppo_scratch/expert_summary.json"))["frames"] == 2048  # same budget as online
    for ck in (run / "decoded_16.pt", run / "bc_64.pt", run / "online.pt", root / "expert/expert.pt"):
        ev = last_json(run_cli("eval", "--checkpoint", ck, "--episodes", 2, "--eval-max-steps", 50).stdout)
        assert ev["eval_episodes"] == 2 and len(ev["eval_returns"]) == 2


def test_pipeline_writes_results_and_plots_and_resumes(pipeline):
    root = pipeline[0]
    md = open(root / "results.md").read()
    for row in ("| random |", "| expert (PPO) |", "| LAPO offline decoder | 16 labeled", "| BC from scratch | 64 labeled",
                "| LAPO online (RL+SL) | 2,048 env frames", "| PPO from scratch | 2,048", "| LAPO online, no SL |",
                "probe accuracy", "| stage1 |"):
        assert row in md, row
    for png in ("offline.png", "online.png", "latents.png", "fdm.png"):
        with open(root / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(root / png) > 5000
        assert f"]({png})" in md
    # every step is done: a second call only rewrites the report
    r = run_cli("pipeline", "--env", "bigfish", "--preset", "tiny", "--out", root, "--ablations")
    assert "python lapo.py" not in r.stdout and r.stdout.count(" done (") == 8


def test_cli_bad_input_is_one_line(pipeline, tmp_path):
    root, run = pipeline[0], pipeline[1]
    cases = [("stage1", "--preset", "tiny", "--data", tmp_path / "nope", "--out", tmp_path / "r"),
             ("collect", "--env", "pong", "--preset", "tiny", "--out", tmp_path / "d"),
             ("stage2", "--preset", "tiny", "--data", root / "data/bigfish", "--out", tmp_path / "no_stage1"),
             ("stage1", "--preset", "tiny", "--data", root / "data/bigfish", "--out", run),
             ("stage3", "--mode", "offline", "--preset", "tiny", "--data", root / "data/bigfish", "--out", run,
              "--labels", 10 ** 7),
             ("eval", "--checkpoint", root / "data/bigfish/train/0.npz")]
    for argv in cases:
        r = run_cli(*argv, ok=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr


def test_action_free_data_trains(tmp_path):
    obs, done, _ = moving_square_video(1024, seed=2)
    for split, sl in (("train", slice(0, 768)), ("test", slice(768, 1024))):
        os.makedirs(tmp_path / f"vid/{split}")
        np.savez(tmp_path / f"vid/{split}/0.npz", obs=obs[sl], done=done[sl])  # no 'ta' at all
    data = lapo.load_split(str(tmp_path / "vid"), "train")
    assert data.ta is None
    out = last_json(run_cli("stage1", "--preset", "tiny", "--data", tmp_path / "vid", "--out", tmp_path / "r").stdout)
    assert out["step"] == 30 and "probe_acc" not in out and out["test_fdm_loss"] > 0
    out = last_json(run_cli("stage2", "--preset", "tiny", "--data", tmp_path / "vid", "--out", tmp_path / "r").stdout)
    assert out["step"] == 30


def test_bench_cli_tiny(tmp_path):
    """`bench` times every stage on freshly collected frames and ends with one JSON line (also in --out)."""
    b = last_json(run_cli("bench", "--preset", "tiny", "--out", tmp_path).stdout)["bench"]
    for k in ("stage1_samples_per_s", "stage2_samples_per_s", "expert_frames_per_s", "online_frames_per_s",
              "collect_frames_per_s", "windows_per_s", "host_mem_x_frames", "data_mem_x_frames"):
        assert b[k] > 0, k
    assert b["data_mem_x_frames"] < 1.2  # the loader holds little beyond the raw frames (measured 1.07 at tiny)
    assert 0 < b["probe_eval_frac"] < 1 and "reference" not in b  # the paper's figures only with --preset paper
    assert json.load(open(tmp_path / "bench_summary.json")) == {"bench": b}
    for bad in (("--preset", "huge"), ("--preset", "tiny", "--steps", 0)):
        r = run_cli("bench", *bad, ok=False)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
