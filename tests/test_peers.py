"""LeRobot's ACT and Diffusion Policy, trained by lerobot-train, rolled out by lingbot's evaluate."""

import json

import pytest

from lingbot.baselines.lerobot_peers import PEERS, load_peer, train_peer
from lingbot.config import EvalConfig
from lingbot.errors import LingbotError
from lingbot.sim.evaluate import evaluate


@pytest.mark.parametrize("kind", PEERS)
def test_a_tiny_peer_trains_through_lerobot_and_rolls_out_through_evaluate(kind, ingested, tmp_path):
    episodes = json.loads((ingested / "split.json").read_text())["train"][:2]
    meta = train_peer(kind, ingested, episodes, tmp_path / kind, steps=2, batch_size=2)
    assert meta["peer"] == kind and meta["episodes"] == sorted(episodes) and meta["steps"] == 2
    # the step time read from LeRobot's own log: without the process's start-up (train_peer_for's calibration)
    assert 0 < meta["step_seconds"] < meta["train_seconds"] / 2
    assert (tmp_path / kind / "config.json").is_file() and (tmp_path / kind / "model.safetensors").is_file()
    cfg = EvalConfig(tasks=("drawer-open-v3",), episodes=1, max_steps=6, workers=1, videos=0)
    summary = evaluate(tmp_path / kind, cfg, tmp_path / "eval", progress=False, load=load_peer)
    assert summary["episodes"] == 1 and summary["mean_episode_length"] >= 1
    # one LeRobot select_action per step: a latency per executed step
    timings = json.loads((tmp_path / "eval" / "timings.json").read_text())
    assert len(timings[0]["latency_ms"]) == json.loads((tmp_path / "eval" / "episodes.json").read_text())[0]["length"]


def test_an_unknown_peer_is_one_error(ingested, tmp_path):
    with pytest.raises(LingbotError, match="unknown peer 'vqbet'"):
        train_peer("vqbet", ingested, [0], tmp_path / "x", steps=1)
    with pytest.raises(LingbotError, match="not a trained peer directory"):
        load_peer(tmp_path)
