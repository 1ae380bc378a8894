"""The real-time policy: cached decoding equals recomputation, determinism, async pipelining, action layout."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lingbot.data.normalization import ChannelLayout
from lingbot.policy.runtime import load_policy
from lingbot.policy.session import recompute_chunk


def _frames(policy, n, seed=0):
    """n observations of random uint8 images (the VAE does not care what it sees) and robot states."""
    rng = np.random.default_rng(seed)
    h, w = policy.meta["image_size"]
    return [{**{key: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for key in policy.cameras},
             policy.state_key: rng.uniform(-0.5, 0.5, policy.meta["state_dim"]).astype(np.float32)}
            for _ in range(n)]


def _drive(session, frames, chunks):
    """Feed frames the way a robot loop does: infer at each chunk boundary, observe in between."""
    out, it = [], iter(frames)
    for _ in range(chunks):
        chunk = session.infer(next(it))
        out.append(chunk)
        for _ in range(len(chunk) - 1):
            session.observe(next(it))
    return out


@pytest.mark.parametrize("history_chunks, exec_step, imagined_noise", [(0, 2, 0.0), (2, 2, 0.0), (2, 4, 0.6)])
def test_cached_decoding_equals_recomputing_the_whole_sequence(tiny_bundle, history_chunks, exec_step,
                                                               imagined_noise):
    policy = load_policy(tiny_bundle, history_chunks=history_chunks, video_steps=4, video_exec_step=exec_step,
                         action_steps=3, imagined_noise=imagined_noise)
    session = policy.new_session()
    chunks = 5
    _drive(session, _frames(policy, 4 * chunks), chunks)
    assert session.chunk == chunks
    # The newest chunk of the cached session, again without any cache (window as the ring's).
    actions, imagined = recompute_chunk(session, chunks)
    assert np.abs(actions.numpy() - session.executing).max() <= 1e-4
    assert (imagined[0] - session.imagined_latents[-1]).abs().max().item() <= 1e-4
    if history_chunks:  # the ring window keeps the cache bounded
        assert session.cache.block.min().item() == 2 * (chunks + 1 - history_chunks)  # whole chunks only


def test_imagined_noise_changes_only_what_the_actions_read(tiny_bundle):
    """Re-noising the imagined latent leaves the imagined video alone and moves the decoded actions."""
    frames = _frames(policy := load_policy(tiny_bundle, video_steps=2, video_exec_step=2), 12, seed=3)
    plain = policy.new_session(seed=5)
    base = _drive(plain, frames, 3)
    noisy = load_policy(tiny_bundle, video_steps=2, video_exec_step=2, imagined_noise=0.7).new_session(seed=5)
    moved = _drive(noisy, frames, 3)
    assert torch.equal(plain.imagined_latents[0], noisy.imagined_latents[0])
    assert not np.allclose(base[0], moved[0])
    with pytest.raises(Exception, match="imagined_noise"):
        load_policy(tiny_bundle, video_steps=4, video_exec_step=2, imagined_noise=0.5)


def test_corrected_actions_become_the_grounded_history(tiny_bundle):
    """What the robot really executed (correct_executed) is what the next chunk is grounded on."""
    policy = load_policy(tiny_bundle, video_steps=2, video_exec_step=2, action_steps=2)
    frames = _frames(policy, 8, seed=4)
    plain, corrected = policy.new_session(seed=1), policy.new_session(seed=1)
    for session in (plain, corrected):
        first = session.infer(frames[0])
        if session is corrected:
            session.correct_executed(np.zeros_like(first))
        for frame in frames[1:4]:
            session.observe(frame)
        session.infer(frames[4])
    assert np.array_equal(corrected.executed[1], policy.layout.to_model(np.zeros_like(first)))
    assert not np.array_equal(plain.executed[1], corrected.executed[1])
    with pytest.raises(Exception, match="expected actions of shape"):
        corrected.correct_executed(np.zeros((1, 1)))
    eager = load_policy(tiny_bundle, asynchronous=True).new_session()
    eager.infer(frames[0])
    with pytest.raises(Exception, match="asynchronous"):
        eager.correct_executed(np.zeros_like(first))
    eager.close()


@pytest.fixture(params=[{"attention": "bidirectional"}, {"video_prediction": False}])
def ablation_bundle(request, tiny_bundle, tmp_path):
    """The tiny bundle's weights under one of the paper's ablations (neither adds parameters)."""
    import shutil

    bundle = tmp_path / "ablation"
    shutil.copytree(tiny_bundle, bundle)
    meta = json.loads((bundle / "policy.json").read_text())
    meta["model"].update(request.param)
    (bundle / "policy.json").write_text(json.dumps(meta))
    return bundle


def test_ablation_bundles_act_and_a_bidirectional_one_recomputes_its_window(ablation_bundle):
    policy = load_policy(ablation_bundle, history_chunks=2, video_steps=2, video_exec_step=2, action_steps=2)
    session = policy.new_session(seed=3)
    chunks = _drive(session, _frames(policy, 16, seed=5), 4)
    assert all(c.shape == (policy.K, policy.meta["action_dim"]) and np.isfinite(c).all() for c in chunks)
    if policy.model.cfg.attention == "bidirectional":
        assert len(session.cache) == 0  # no KV cache: each chunk recomputed the last history_chunks
        actions, _ = recompute_chunk(session, 4, last=2)
        assert np.abs(actions.numpy() - session.executing).max() <= 1e-5
    else:
        assert all(float(x.abs().max()) == 0 for x in session.imagined_latents)  # nothing imagined
    with pytest.raises(Exception, match="asynchronous"):
        load_policy(ablation_bundle, asynchronous=True)


@pytest.fixture
def keypoint_bundle(tiny_bundle, tmp_path):
    """The tiny bundle with keypoints (`model.keypoints`), their weights drawn at random (zero-initialised
    projections would hide them)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lingbot.model.world_model import WorldModel
    from lingbot.policy.bundle import read_bundle

    bundle = tmp_path / "keypoints"
    shutil.copytree(tiny_bundle, bundle)
    meta = json.loads((bundle / "policy.json").read_text())
    meta["model"]["keypoints"] = 8
    (bundle / "policy.json").write_text(json.dumps(meta))
    meta = read_bundle(bundle)
    torch.manual_seed(0)
    fresh = WorldModel(meta["model_config"], cameras=len(meta["cameras"]), actions_per_chunk=4).state_dict()
    weights = load_file(str(bundle / "model.safetensors"))
    weights |= {k: torch.randn_like(v) * 0.5 for k, v in fresh.items() if k.startswith("keypoint")}
    save_file(weights, str(bundle / "model.safetensors"))
    return bundle


def test_keypoints_read_the_real_frame_a_chunk_starts_from_cached_as_recomputed(keypoint_bundle, tiny_bundle):
    kw = dict(history_chunks=2, video_steps=2, video_exec_step=2, action_steps=2)
    policy = load_policy(keypoint_bundle, **kw)
    assert policy.model.keypoint_net is not None
    frames = _frames(policy, 16, seed=4)
    session = policy.new_session(seed=1)
    _drive(session, frames, 4)
    actions, imagined = recompute_chunk(session, 4)
    assert np.abs(actions.numpy() - session.executing).max() <= 1e-4
    assert (imagined[0] - session.imagined_latents[-1]).abs().max().item() <= 1e-4
    plain = load_policy(tiny_bundle, **kw).new_session(seed=1)  # the same weights without keypoints
    assert not np.allclose(_drive(plain, frames, 4)[-1], _drive(policy.new_session(seed=1), frames, 4)[-1])


def test_session_is_deterministic_and_isolated(tiny_bundle):
    policy = load_policy(tiny_bundle)
    frames = _frames(policy, 12, seed=1)
    a = _drive(policy.new_session(seed=7), frames, 3)
    noise = policy.new_session(seed=8)  # another session interleaved: must not change the first
    _drive(noise, _frames(policy, 12, seed=2), 2)
    b = _drive(policy.new_session(seed=7), frames, 3)
    c = _drive(policy.new_session(seed=9), frames, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.allclose(a[1], c[1])
    assert a[0].shape == (policy.K, policy.meta["action_dim"]) and a[0].dtype == np.float32


def test_the_session_hands_back_its_imagined_and_real_video_decoded(tiny_bundle):
    from lingbot.vae.wan import decode_latents

    policy = load_policy(tiny_bundle, video_steps=2, video_exec_step=2, action_steps=2)
    session = policy.new_session(seed=2)
    _drive(session, _frames(policy, 12, seed=6), 3)
    h, w = policy.meta["image_size"]
    imagined = session.imagined_video(1)  # chunk 0 (the first real frame) and the 3 imagined chunks
    assert imagined.shape == (1 + 4 * 3, h, w, 3) and imagined.dtype == np.uint8
    latents = torch.stack([session.real_latents[0], *session.imagined_latents])[:, 1]
    np.testing.assert_array_equal(imagined, decode_latents(policy.vae, latents.permute(1, 0, 2, 3)[None])[0])
    real = session.reconstructed_video(1, chunks=2)
    assert real.shape == (1 + 4, h, w, 3) and np.array_equal(real[0], imagined[0])
    assert not np.array_equal(real[1:], imagined[1:5])


def test_async_mode_returns_precomputed_chunks_from_the_imagined_history(tiny_bundle):
    sync = load_policy(tiny_bundle)
    asynchronous = load_policy(tiny_bundle, asynchronous=True)
    frames = _frames(sync, 16, seed=3)
    s, a = sync.new_session(seed=4), asynchronous.new_session(seed=4)
    out_s, out_a = _drive(s, frames, 4), _drive(a, frames, 4)
    # The first chunk is computed on the spot in both modes.
    np.testing.assert_array_equal(out_s[0], out_a[0])
    # Later chunks were computed before their real frames existed: they differ from sync mode, but
    # async mode is deterministic too.
    assert not np.allclose(out_s[2], out_a[2])
    again = asynchronous.new_session(seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(out_a, _drive(again, frames, 4)))
    a.close()
    again.close()
    # The background job of the last boundary grounded the real frames of every executed chunk, like sync.
    assert a.chunk == s.chunk == 4 and len(a.real_latents) == 4
    assert all(torch.equal(x, y) for x, y in zip(a.real_latents, s.real_latents))


def test_action_layout_keeps_time_rows_and_feature_columns(latent_cache, ingested):
    """A cached chunk mapped to the robot gives the dataset's actions in (time, feature) order."""
    from lingbot.data.lerobot_io import open_layout, read_state_action

    manifest = json.loads((latent_cache / "manifest.json").read_text())
    stats = manifest["stats"]["action"]
    episode, meta = next(iter(manifest["episodes"].items()))
    with safe_open(str(latent_cache / manifest["shards"][meta["shard"]]), framework="pt") as f:
        cached = f.get_tensor(f"{episode}/actions")  # (latents, K, A) raw robot units
    from lingbot.data.normalization import normalize

    model_space = normalize(cached, stats).numpy()
    layout = ChannelLayout(stats, robot_dim=model_space.shape[-1], model_channels=16)
    padded = np.zeros((*model_space.shape[:2], 16), np.float32)
    padded[..., : model_space.shape[-1]] = model_space
    index, _, actions = read_state_action(open_layout(ingested / "dataset"), "observation.state", "action")
    raw = actions[index == int(episode)]
    K = model_space.shape[1]
    for j in (1, 2):
        np.testing.assert_allclose(layout.to_robot(padded[j]), raw[K * (j - 1) : K * j], atol=1e-5)
    np.testing.assert_allclose(layout.to_model(raw[:K])[:, : raw.shape[1]], model_space[1], atol=1e-5)
    assert not np.allclose(raw[:K].T.reshape(K, -1), raw[:K])  # a (f t) reshape would be caught


def test_bad_observation_is_one_clear_error(tiny_bundle):
    from lingbot.errors import LingbotError

    policy = load_policy(tiny_bundle)
    session = policy.new_session()
    obs = _frames(policy, 1)[0]
    missing = dict(obs)
    missing.pop(policy.cameras[0])
    with pytest.raises(LingbotError, match=policy.cameras[0]):
        session.infer(missing)
    wrong = {k: v.astype(np.float32) for k, v in obs.items()}
    with pytest.raises(LingbotError, match="uint8"):
        session.infer(wrong)
    no_state = dict(obs)
    no_state.pop(policy.state_key)
    with pytest.raises(LingbotError, match=policy.state_key):
        session.infer(no_state)
    short = {**obs, policy.state_key: obs[policy.state_key][:-1]}
    with pytest.raises(LingbotError, match=f"expected {policy.meta['state_dim']} finite values"):
        session.infer(short)


def test_a_bundle_from_before_the_state_input_still_loads_and_acts(tiny_bundle, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    old = tmp_path / "old-bundle"
    shutil.copytree(tiny_bundle, old)
    meta = json.loads((old / "policy.json").read_text())
    del meta["model"]["state_channels"], meta["state_dim"]
    (old / "policy.json").write_text(json.dumps(meta))
    weights = {k: v for k, v in load_file(str(old / "model.safetensors")).items() if not k.startswith("state_in.")}
    save_file(weights, str(old / "model.safetensors"))
    policy = load_policy(old)
    assert policy.model.cfg.state_channels == 0 and policy.state_layout is None
    obs = _frames(load_policy(tiny_bundle), 1)[0]
    obs.pop(policy.state_key)  # such a policy needs no state
    assert policy.new_session().infer(obs).shape == (policy.K, policy.meta["action_dim"])


def test_the_robot_state_reaches_the_actions_of_its_chunk(tiny_bundle):
    policy = load_policy(tiny_bundle, video_steps=2, video_exec_step=1, action_steps=2)
    assert policy.model.cfg.state_channels and policy.state_layout.robot_dim == policy.meta["state_dim"]
    # Three training steps leave the zero-initialised state projection ~0: give it weight, to see the plumbing.
    torch.nn.init.normal_(policy.model.state_in.weight, std=0.5)
    obs = _frames(policy, 1)[0]
    moved = {**obs, policy.state_key: obs[policy.state_key] + 0.3}
    a = policy.new_session(seed=3).infer(obs)
    b = policy.new_session(seed=3).infer(moved)
    assert np.abs(a - b).max() > 1e-6  # same frames and noise: only the state differs


def test_evaluate_rolls_out_in_metaworld_and_scores(tiny_bundle, tmp_path, tiny_config):
    from lingbot.eval.metrics import wilson_interval
    from lingbot.sim.evaluate import evaluate, write_plots

    cfg = tiny_config.evaluate
    summary = evaluate(tiny_bundle, cfg, tmp_path / "eval", progress=False)
    episodes = json.loads((tmp_path / "eval" / "episodes.json").read_text())
    assert len(episodes) == cfg.episodes * len(cfg.tasks) == summary["episodes"]
    assert {e["seed"] for e in episodes} == {cfg.seed + i for i in range(cfg.episodes)}
    timings = json.loads((tmp_path / "eval" / "timings.json").read_text())
    assert [(t["task"], t["seed"]) for t in timings] == [(e["task"], e["seed"]) for e in episodes]
    for e, t in zip(episodes, timings):
        # a chunk per K steps until the step budget (a tiny model does not open the drawer)
        assert e["length"] <= cfg.max_steps and len(t["latency_ms"]) == -(-e["length"] // 4)
        assert "latency_ms" not in e and "wall_s" not in e  # outcomes only: the same bytes every run
    wins = sum(e["success"] for e in episodes)
    assert summary["success_rate"] == wins / len(episodes)
    assert (summary["success_ci_low"], summary["success_ci_high"]) == pytest.approx(wilson_interval(wins, len(episodes)), abs=1e-4)
    assert summary["latency_ms_p95"] >= summary["latency_ms_mean"] * 0.5 > 0
    videos = list((tmp_path / "eval" / "videos").glob("*.mp4"))
    assert len(videos) == cfg.videos and videos[0].stat().st_size > 1000
    write_plots(summary, tmp_path / "eval", cfg.tasks, tmp_path / "tasks.tsv", tmp_path / "latency.tsv")
    assert (tmp_path / "tasks.tsv").read_text().splitlines()[1].startswith(cfg.tasks[0])


def test_wilson_interval_known_values():
    from lingbot.eval.metrics import wilson_interval

    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_the_ring_at_chunk_40_shows_what_a_training_window_shows(tiny_bundle):
    """Mid-episode the ring holds whole chunks c-W+1..c-1 (video and actions together), as the noisy
    video of a training window's late chunk sees them under the same sliding mask; and the embedded
    default trains windows at least twice the ring, so the oldest chunk in view has had its own full
    ring, as it has at chunk 40 of a rollout."""
    from pathlib import Path

    from lingbot.config import load_run_config
    from lingbot.model.world_model import attention_mask

    W, chunks = 3, 40
    policy = load_policy(tiny_bundle, history_chunks=W, video_steps=2, video_exec_step=2, action_steps=2)
    session = policy.new_session()
    _drive(session, _frames(policy, 4 * chunks), chunks)
    history = session.cache.block[: session.imagined_at]  # what chunk 40's noisy video attends to
    ring = sorted({int(b) - 2 * chunks for b in history})
    assert ring == [2 * c + s for c in range(-(W - 1), 0) for s in (0, 1)]

    n = 2 * W  # a training window: clean blocks of every chunk, then the last chunk's noisy video
    block = torch.cat([torch.arange(2 * n), torch.tensor([2 * (n - 1)])])
    clean = torch.cat([torch.ones(2 * n, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)])
    mask = attention_mask(block, clean, W)
    seen = sorted(int(b) - 2 * (n - 1) for b in block[:-1][mask[-1, :-1]])
    assert seen == ring
    oldest = 2 * (n - W)  # the clean video of the oldest chunk in view saw a full ring itself
    assert len(set((block[mask[oldest]] // 2).tolist())) == W

    run = load_run_config(Path(__file__).resolve().parents[1] / "params.yaml")
    assert run.policy.history_chunks == run.model.window_chunks > 0
    assert min(run.pretrain.max_chunks, run.finetune.max_chunks) >= 2 * run.model.window_chunks


def test_a_ring_other_than_the_trained_window_is_warned_about(tiny_bundle, tmp_path):
    import shutil

    bundle = tmp_path / "policy"
    shutil.copytree(tiny_bundle, bundle)
    meta = json.loads((bundle / "policy.json").read_text())
    meta["model"]["window_chunks"] = 4
    (bundle / "policy.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="trained with a 4-chunk attention window"):
        load_policy(bundle, history_chunks=6)
    with pytest.warns(UserWarning, match="noise level 0.75"):
        load_policy(tiny_bundle, video_steps=4, video_exec_step=2, shift=3.0)


def test_actions_reach_the_data_range_beyond_its_quantiles():
    stats = {"q01": [-0.5, 0.0], "q99": [0.5, 1.0], "min": [-1.0, 0.0], "max": [1.0, 2.0]}
    layout = ChannelLayout(stats, 2, 4)
    clipped = layout.clip(torch.tensor([[5.0, 5.0, 0.0, 0.0], [-5.0, -5.0, 0.0, 0.0]]))
    assert layout.to_robot(clipped.numpy()).tolist() == [[1.0, 2.0], [-1.0, 0.0]]


def test_training_and_the_policy_normalise_to_the_same_floats():
    """Training's latent windows (torch) and the policy's channel layout (numpy) share one normalisation:
    the same float32 bits, by the arithmetic the cache has always been read with; to_robot inverts it."""
    from lingbot.data.normalization import normalize

    rng = np.random.default_rng(0)
    q01 = rng.uniform(-2, 1, 5)
    stats = {"q01": q01.tolist(), "q99": (q01 + rng.uniform(0.1, 3, 5)).tolist()}
    stats["q99"][3] = stats["q01"][3]  # a constant channel: its span is floored
    robot = rng.uniform(-3, 3, (8, 5)).astype(np.float32)
    training = normalize(torch.from_numpy(robot), stats)  # what LatentWindows.window returns
    layout = ChannelLayout(stats, 5, 7)
    policy = layout.to_model(robot)
    assert training.dtype == torch.float32 and policy.dtype == np.float32
    np.testing.assert_array_equal(policy[:, :5], training.numpy())
    assert not policy[:, 5:].any()
    lo, hi = torch.tensor(stats["q01"]), torch.tensor(stats["q99"])
    assert torch.equal(training, 2 * (torch.from_numpy(robot) - lo) / (hi - lo).clamp_min(1e-6) - 1)
    np.testing.assert_allclose(layout.to_robot(policy), robot, atol=1e-5)


def test_success_metrics_and_runs_pooled_over_seeds():
    from lingbot.eval.metrics import pooled_runs, success_metrics, wilson_interval

    one = success_metrics([True] * 8 + [False] * 2, "push-v3/")
    assert one == {"push-v3/success_rate": 0.8, "push-v3/success_ci_low": round(wilson_interval(8, 10)[0], 4),
                   "push-v3/success_ci_high": round(wilson_interval(8, 10)[1], 4), "push-v3/episodes": 10}
    runs = [{"success_rate": 0.2, "episodes": 50}, {"success_rate": 0.02, "episodes": 50},
            {"success_rate": 0.24, "episodes": 50}]
    pooled = pooled_runs(runs)
    assert pooled["wins"] == [10, 1, 12]
    assert pooled["mean"] == pytest.approx(np.mean([0.2, 0.02, 0.24]))
    assert pooled["std"] == pytest.approx(np.std([0.2, 0.02, 0.24], ddof=1))
    assert (pooled["ci_low"], pooled["ci_high"]) == wilson_interval(23, 150)
    assert pooled_runs(runs[:1])["std"] is None
