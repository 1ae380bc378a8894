"""The latent cache: alignment on a known episode, resume, refusal of foreign inputs, the windows Dataset."""

import dataclasses
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lingbot.config import LatentsConfig
from lingbot.data.latents import LatentWindows, build_cache, collate_windows, open_manifest, vae_fingerprint
from lingbot.data.lerobot_io import iter_episode_frames, open_layout
from lingbot.errors import LingbotError
from lingbot.vae.wan import encode_clip, load_vae, to_pixels

ONE_PER_SHARD = LatentsConfig(episodes_per_shard=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, ingested, vae_dir):
    out = tmp_path_factory.mktemp("latents") / "cache"
    report = build_cache(ingested, vae_dir, out, ONE_PER_SHARD, progress=False)
    return out, report


def test_cache_aligns_latents_actions_and_states_of_a_known_episode(cache, ingested, vae_dir):
    from safetensors.torch import load_file

    out, report = cache
    manifest = open_manifest(out)
    assert report["episodes"] == report["shards"] == len(manifest["episodes"])
    episode = 1
    meta = manifest["episodes"][str(episode)]
    tensors = load_file(str(out / manifest["shards"][meta["shard"]]))
    video, actions = tensors[f"{episode}/video"], tensors[f"{episode}/actions"]
    mask, state = tensors[f"{episode}/action_mask"], tensors[f"{episode}/state"]

    frames = pq.read_table(next((ingested / "dataset" / "data").rglob("*.parquet"))).to_pandas()
    frames = frames[frames["episode_index"] == episode]
    raw_actions = np.stack(frames["action"].to_numpy())
    raw_state = np.stack(frames["observation.state"].to_numpy())
    n_latent = 1 + (len(frames) - 1) // 4
    assert meta["latent_frames"] == n_latent == len(video) == len(actions) == len(state)
    assert manifest["actions_per_latent"] == 4 and actions.shape[1:] == (4, 4)
    assert not mask[0].any() and mask[1:].all() and torch.all(actions[0] == 0)
    for j in range(1, n_latent):  # latent j <- frames 4j-3..4j, realised by actions 4j-4..4j-1
        np.testing.assert_array_equal(actions[j].numpy(), raw_actions[4 * j - 4 : 4 * j])
        np.testing.assert_array_equal(state[j].numpy(), raw_state[4 * j])
    np.testing.assert_array_equal(state[0].numpy(), raw_state[0])

    # Video latents of each camera are the VAE's encoding of that episode's decoded frames.
    vae = load_vae(vae_dir)
    layout = open_layout(ingested / "dataset")
    for c, key in enumerate(manifest["cameras"]):
        ((_, clip, _),) = list(iter_episode_frames(layout, key, [episode]))
        expected = encode_clip(vae, to_pixels(clip[: 1 + 4 * (n_latent - 1)]))[0].transpose(0, 1)
        torch.testing.assert_close(video[:, c], expected, atol=1e-5, rtol=0)
    task = manifest["tasks"][meta["task_index"]]
    assert task in ("open the drawer", "close the drawer")


def test_interrupted_cache_resumes_to_identical_shards(cache, ingested, vae_dir, tmp_path):
    out, report = cache
    resumed = tmp_path / "cache"
    half = build_cache(ingested, vae_dir, resumed, ONE_PER_SHARD, shard=(0, 2), progress=False)
    assert half["shards_written"] == (report["shards"] + 1) // 2
    (resumed / ".shard-00001.safetensors.tmp-leftover").write_bytes(b"killed mid-write")
    with pytest.raises(LingbotError, match="incomplete cache"):
        open_manifest(resumed)
    rest = build_cache(ingested, vae_dir, resumed, ONE_PER_SHARD, progress=False)
    assert rest["shards_written"] == report["shards"] // 2  # only the missing ones
    for name in open_manifest(out)["shards"] + ["tasks.safetensors"]:
        assert (resumed / name).read_bytes() == (out / name).read_bytes(), name


def test_cache_from_other_inputs_is_refused(cache, ingested, vae_dir, tmp_path):
    out, _ = cache
    other_vae = tmp_path / "vae"
    shutil.copytree(vae_dir, other_vae)
    config = json.loads((other_vae / "config.json").read_text())
    config["latents_std"] = [2 * s for s in config["latents_std"]]
    (other_vae / "config.json").write_text(json.dumps(config))
    work = tmp_path / "cache"
    shutil.copytree(out, work)
    with pytest.raises(LingbotError, match="vae fingerprint differs"):
        build_cache(ingested, other_vae, work, ONE_PER_SHARD, progress=False)
    with pytest.raises(LingbotError, match="params fingerprint differs"):
        build_cache(ingested, vae_dir, work, dataclasses.replace(ONE_PER_SHARD, frame_stride=2), progress=False)
    with pytest.raises(LingbotError, match="cache built from another vae"):
        LatentWindows(work, expect={"vae": vae_fingerprint(other_vae)})


def test_windows_and_the_step_sampler_yield_model_ready_tensors(cache):
    from lingbot.config import TrainConfig
    from lingbot.train.loop import StepSampler

    out, _ = cache
    data = LatentWindows(out, split="train")
    manifest = data.manifest
    item = data.window(data.episodes[0], 1, 2)
    cams, z = len(manifest["cameras"]), manifest["z_dim"]
    assert item["video"].shape[:3] == (2, cams, z) and item["video"].dtype == torch.float32
    assert item["actions"].shape == (2, 4, 4) and item["action_mask"].dtype == torch.bool
    assert item["task"].shape == (1, 384)
    # Quantile-normalised actions: q01..q99 of the train actions map to -1..1.
    stats = manifest["stats"]["action"]
    assert item["actions"][item["action_mask"]].abs().max() < 3 and len(stats["q01"]) == 4
    # One sampler: the same (seed, step) gives the same batch, other steps other draws; every window
    # of a batch as long as its shortest episode allows.
    cfg = TrainConfig(batch_size=3, max_chunks=4, seed=7)
    sampler = StepSampler(data, cfg, data.episodes)
    batch = sampler.batch(5)
    again = StepSampler(LatentWindows(out), cfg, data.episodes).batch(5)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    n = batch["video"].shape[1]
    assert batch["video"].shape[:3] == (3, n, cams) and batch["actions"].shape[:2] == (3, n)
    assert n == min(4, *(manifest["episodes"][str(int(e))]["latent_frames"] for e in batch["episode"]))
    assert len({(tuple(sampler.batch(s)["episode"].tolist()), tuple(sampler.batch(s)["start"].tolist()))
                for s in range(8)}) > 1
    with pytest.raises(ValueError, match="different lengths"):
        collate_windows([data.window(data.episodes[0], 0, 2), data.window(data.episodes[0], 0, 3)])


def test_window_gives_each_chunk_the_state_its_actions_start_from(cache):
    """Chunk j's actions (frames 4j-4 .. 4j-1) start at latent frame j-1's state, also for the first
    chunk of a window starting mid-episode (not at its own state, the end of the move)."""
    from safetensors.torch import load_file

    from lingbot.data.normalization import normalize

    out, _ = cache
    data = LatentWindows(out, split="train")
    episode = data.episodes[0]
    meta = data.manifest["episodes"][str(episode)]
    assert meta["latent_frames"] >= 3
    states = normalize(load_file(str(out / data.manifest["shards"][meta["shard"]]))[f"{episode}/state"],
                       data.manifest["stats"]["state"])
    mid = data.window(episode, 1, 2)["start_state"]
    assert torch.equal(mid, states[0:2])
    first = data.window(episode, 0, 3)["start_state"]
    assert torch.equal(first, states[[0, 0, 1]])  # chunk 0 has no actions: its own state


def test_window_starts_favour_the_episode_start():
    from lingbot.data.latents import window_start

    rng = np.random.default_rng(0)
    uniform = [window_start(rng, 12, 3, 0.0) for _ in range(2000)]
    favoured = [window_start(rng, 12, 3, 0.25) for _ in range(2000)]
    assert set(uniform) == set(range(10)) and set(favoured) == set(range(10))
    assert 0.06 < uniform.count(0) / 2000 < 0.14  # 1/10
    assert 0.28 < favoured.count(0) / 2000 < 0.37  # 0.25 + 0.75/10
    assert window_start(rng, 12, 3, 1.0) == 0


def test_phase_augmentation_encodes_each_episode_from_later_frames(cache, ingested, vae_dir, tmp_path):
    """`latents.phases: 2`: episode e also as "e@1", the episode as if recorded from dataset frame 1 on
    (its frames, actions and states shifted by one); phase 0 is the plain cache, byte for byte; the
    training sampler draws both phases."""
    from safetensors.torch import load_file

    from lingbot.config import TrainConfig
    from lingbot.train.loop import StepSampler, select_episodes

    plain, _ = cache
    out = tmp_path / "phased"
    build_cache(ingested, vae_dir, out, dataclasses.replace(ONE_PER_SHARD, phases=2), progress=False)
    manifest, base = open_manifest(out), open_manifest(plain)
    assert manifest["fingerprints"]["params"] != base["fingerprints"]["params"]
    assert "phase_latent_frames" not in base["episodes"]["1"]
    episode = 1
    meta = manifest["episodes"][str(episode)]
    tensors = load_file(str(out / manifest["shards"][meta["shard"]]))
    before = load_file(str(plain / base["shards"][meta["shard"]]))
    for key, value in before.items():
        assert torch.equal(tensors[key], value), key

    frames = pq.read_table(next((ingested / "dataset" / "data").rglob("*.parquet"))).to_pandas()
    frames = frames[frames["episode_index"] == episode]
    raw_actions = np.stack(frames["action"].to_numpy())[1:]
    raw_state = np.stack(frames["observation.state"].to_numpy())[1:]
    n_latent = 1 + (len(raw_actions) - 1) // 4
    assert meta["phase_latent_frames"] == [meta["latent_frames"], n_latent]
    video, actions, state = (tensors[f"{episode}@1/{k}"] for k in ("video", "actions", "state"))
    assert len(video) == len(actions) == len(state) == n_latent
    for j in range(1, n_latent):
        np.testing.assert_array_equal(actions[j].numpy(), raw_actions[4 * j - 4 : 4 * j])
        np.testing.assert_array_equal(state[j].numpy(), raw_state[4 * j])
    np.testing.assert_array_equal(state[0].numpy(), raw_state[0])
    vae = load_vae(vae_dir)
    key = manifest["cameras"][0]
    ((_, clip, _),) = list(iter_episode_frames(open_layout(ingested / "dataset"), key, [episode]))
    expected = encode_clip(vae, to_pixels(clip[1 : 2 + 4 * (n_latent - 1)]))[0].transpose(0, 1)
    torch.testing.assert_close(video[:, 0], expected, atol=1e-5, rtol=0)

    data = LatentWindows(out)
    window = data.window(episode, 1, 2, phase=1)
    torch.testing.assert_close(window["video"], video[1:3])
    cfg = TrainConfig(batch_size=4, max_chunks=3)
    sampler = StepSampler(data, cfg, select_episodes(manifest, cfg))
    assert sampler.phases == 2
    batches = [sampler.batch(step) for step in range(4)]
    assert {int(p) for b in batches for p in b["phase"]} == {0, 1}
    b = batches[0]
    row = int(b["phase"].argmax())
    again = data.window(int(b["episode"][row]), int(b["start"][row]), b["video"].shape[1], int(b["phase"][row]))
    assert torch.equal(b["video"][row], again["video"]) and torch.equal(b["actions"][row], again["actions"])

    with pytest.raises(LingbotError, match="latents.phases 5: must be 1 .. 4"):
        build_cache(ingested, vae_dir, tmp_path / "bad", dataclasses.replace(ONE_PER_SHARD, phases=5), progress=False)
    assert not (tmp_path / "bad").exists()
