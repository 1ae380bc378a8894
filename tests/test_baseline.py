"""The plain image BC baseline: its samples line up with the demos, it learns, it rolls out like a policy."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def bc_data(ingested, latent_cache, tiny_config):
    from lingbot.baselines.bc import load_demos

    return load_demos(ingested, latent_cache, tiny_config.finetune)


def test_samples_are_the_finetune_episodes_with_their_next_actions(bc_data, ingested, latent_cache, tiny_config):
    from lingbot.data.latents import open_manifest
    from lingbot.data.lerobot_io import open_layout, read_state_action
    from lingbot.train.loop import select_episodes

    assert bc_data["episodes"] == select_episodes(open_manifest(latent_cache), tiny_config.finetune)
    layout = open_layout(ingested / "dataset")
    index, _, actions = read_state_action(layout, "observation.state", "action")
    first = bc_data["episodes"][0]
    raw = actions[index == first]
    n = len(raw)
    assert bc_data["images"].shape[:2] == (len(bc_data["state"]), 2) and bc_data["images"].dtype == np.uint8
    stats = bc_data["stats"]["action"]
    lo, hi = np.array(stats["q01"]), np.array(stats["q99"])
    expect = 2 * (raw - lo) / np.maximum(hi - lo, 1e-6) - 1
    # sample t holds actions t..t+K-1 of its episode, the last one repeated past the end
    np.testing.assert_allclose(bc_data["actions"][0], expect[:4], atol=1e-5)
    np.testing.assert_allclose(bc_data["actions"][n - 2], expect[[n - 2, n - 1, n - 1, n - 1]], atol=1e-5)


def test_random_shift_crops_the_padded_image():
    from lingbot.baselines.bc import random_shift

    images = torch.arange(2 * 2 * 3 * 8 * 8, dtype=torch.float32).view(2, 2, 3, 8, 8)
    assert torch.equal(random_shift(images, 0, torch.Generator()), images)
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images.flatten(0, 1), (2,) * 4, mode="replicate")
    for i, out in enumerate(shifted.flatten(0, 1)):
        crops = [padded[i, :, y:y + 8, x:x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(out, c) for c in crops)


def test_bc_learns_saves_and_rolls_out(bc_data, tmp_path, tiny_config):
    from lingbot.baselines.bc import BCConfig, load_bc, save_bc, train_bc
    from lingbot.sim.evaluate import evaluate

    cfg = BCConfig(steps=60, batch_size=8, width=8, hidden=32, lr=3e-3)
    model, losses, _ = train_bc(bc_data, cfg, progress=False)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    save_bc(model, bc_data, cfg, tmp_path / "bc")
    policy = load_bc(tmp_path / "bc")
    session = policy.new_session()
    obs = {key: bc_data["images"][0, i] for i, key in enumerate(policy.cameras)}
    stats = bc_data["stats"]["state"]
    lo, hi = np.array(stats["q01"]), np.array(stats["q99"])
    obs[policy.state_key] = (bc_data["state"][0] + 1) / 2 * np.maximum(hi - lo, 1e-6) + lo
    actions = session.infer(obs)
    assert actions.shape == (cfg.chunk, 4)
    with torch.no_grad():
        images = torch.from_numpy(bc_data["images"][:1]).permute(0, 1, 4, 2, 3).float().div(127.5).sub(1)
        direct = model(images, torch.from_numpy(bc_data["state"][:1]))[0].numpy()
    a = bc_data["stats"]["action"]
    expect = (direct + 1) / 2 * np.maximum(np.array(a["q99"]) - np.array(a["q01"]), 1e-6) + np.array(a["q01"])
    np.testing.assert_allclose(actions, expect, atol=1e-4)

    cfg_eval = dataclasses.replace(tiny_config.evaluate, episodes=1, videos=0, workers=1)
    summary = evaluate(tmp_path / "bc", cfg_eval, tmp_path / "eval", progress=False, load=load_bc)
    episodes = json.loads((tmp_path / "eval" / "episodes.json").read_text())
    assert summary["episodes"] == len(episodes) == len(cfg_eval.tasks)
    timings = json.loads((tmp_path / "eval" / "timings.json").read_text())
    assert all(len(t["latency_ms"]) == -(-e["length"] // cfg.chunk) for e, t in zip(episodes, timings))


def test_not_a_bc_directory_is_one_clear_error(tmp_path):
    from lingbot.baselines.bc import load_bc
    from lingbot.errors import LingbotError

    with pytest.raises(LingbotError, match="bc.json: missing"):
        load_bc(tmp_path)


def test_the_baseline_command_refuses_an_unknown_kind_or_a_run_without_a_simulator(tmp_path, capsys):
    from lingbot.cli import main

    common = ["--preset", "tiny", "--demos", str(tmp_path), "--cache", str(tmp_path), "--out", str(tmp_path / "m"),
              "--eval-out", str(tmp_path / "e")]
    assert main(["baseline", "vqbet", *common]) == 2
    assert "baseline: unknown kind 'vqbet' (known: bc, act, diffusion)" in capsys.readouterr().err
    assert main(["baseline", "bc", *common, "--set", "evaluate.env=offline"]) == 2
    assert "rolled out in simulation (evaluate.env sim)" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()
