"""Bring your own robot: a LeRobot dataset of another robot through `dvc repro` to a gated release,
with offline evaluation, then pulled and served."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import REPO, dvc, new_project

DOF, STATE, FPS, H, W = 14, 9, 25, 48, 80  # an ALOHA-like arm pair, non-square images
CAMERAS = ("observation.images.cam_high", "observation.images.cam_left_wrist")
TASKS = ("fold the towel", "hand over the cup")


@pytest.fixture(scope="module")
def robot_dataset(tmp_path_factory):
    """Six short episodes recorded through LeRobotDataset.create: 14 joints, 9 state channels, 25 fps,
    two 48x80 cameras. Smooth joint trajectories, and frames that move with them."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = tmp_path_factory.mktemp("own-robot") / "aloha_towel"
    joints = [f"{side}_joint{i}" for side in ("left", "right") for i in range(DOF // 2)]
    features = {
        "observation.state": {"dtype": "float32", "shape": (STATE,), "names": [f"s{i}" for i in range(STATE)]},
        "action": {"dtype": "float32", "shape": (DOF,), "names": {"motors": joints}},
        **{key: {"dtype": "video", "shape": (H, W, 3), "names": ["height", "width", "channels"]} for key in CAMERAS},
    }
    ds = LeRobotDataset.create("someone/aloha_towel", fps=FPS, features=features, root=root, robot_type="aloha",
                               streaming_encoding=True)
    rng = np.random.default_rng(3)
    for ep in range(6):
        phase = rng.uniform(0, np.pi, DOF)
        for t in range(21):
            action = 0.8 * np.sin(phase + 0.15 * t).astype(np.float32)
            image = np.full((H, W, 3), 40, np.uint8)
            image[:, (4 * t + 8 * ep) % W] = 220  # a bar sweeping across the frame
            ds.add_frame({"observation.state": np.resize(action, STATE) * 0.5, "action": action,
                          **{key: image for key in CAMERAS}, "task": TASKS[ep % 2]})
        ds.save_episode()
    ds.finalize()
    return root, joints


@pytest.fixture(scope="module")
def released(tmp_path_factory, robot_dataset):
    from test_pipeline import TINY_PARAMS

    root, _ = robot_dataset
    params = json.loads(json.dumps(TINY_PARAMS))
    params["ingest"] = {"source": str(root), "val_fraction": 0.34}
    params["validate"] = {"min_episode_length": 8}
    params["finetune"]["tasks"] = [TASKS[0]]
    params["evaluate"] = {"env": "offline", "videos": 1}
    params["publish"] = {"repo_id": "lingbot/aloha-towel", "target": "local", "local_dir": "hub",
                         "max_action_error": 2.0}
    project = new_project(tmp_path_factory, "own-robot-project", params)
    return project, dvc(project, "repro")


def test_the_chain_reaches_a_release_without_a_simulator(released, robot_dataset):
    project, proc = released
    _, joints = robot_dataset
    assert "collect: skipped" in proc.stdout
    assert json.loads((project / "data/collected/SKIPPED.json").read_text())["source"].endswith("aloha_towel")
    metrics = json.loads((project / "reports/eval.json").read_text())
    assert "success_rate" not in metrics  # no simulator ran
    assert 0 < metrics["offline/action_error"] < 2.0 and metrics["offline/episodes"] == 1  # the held-out towel one
    assert metrics["offline/chunks"] == 5  # 21 frames at 4 actions per chunk
    assert [f"offline/action_error_step{i}" in metrics for i in range(1, 5)] == [True] * 4
    assert f"offline/action_error_robot/{joints[13]}" in metrics and "offline/imagined_psnr_db" in metrics
    assert not any("latency" in k for k in metrics)  # timings sit beside the results
    tsv = (project / "reports/eval_action_error.tsv").read_text().splitlines()
    assert tsv[0] == "step\taction_error" and len(tsv) == 5
    figures = list((project / "reports/eval/offline/figures").glob("*.png"))
    assert len(figures) == 1
    bundle = json.loads((project / "models/policy/policy.json").read_text())
    assert bundle["image_size"] == [H, W] and bundle["action_dim"] == DOF and bundle["fps"] == FPS
    assert bundle["robot"] == {"type": "aloha", "action_names": joints, "state_names": [f"s{i}" for i in range(STATE)]}
    published = json.loads((project / "reports/publish.json").read_text())
    assert published["version"] == 1
    card = next((project / "hub").rglob("README.md")).read_text()
    assert "publish.max_action_error" in card and joints[0] in card
    # The chain is up to date (the baselines' pipeline, never run here, is not part of it).
    assert dvc(project, "status", "dvc.yaml").stdout.strip() in ("", "Data and pipelines are up to date.")


def test_the_gate_refuses_a_release_above_the_error_bound(released):
    project, _ = released
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["publish"]["max_action_error"] = 1e-4
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        proc = dvc(project, "repro", "publish", check=False)
        assert proc.returncode != 0
        assert "above publish.max_action_error" in proc.stdout + proc.stderr
        assert sorted(p.name for p in (project / "hub/lingbot/aloha-towel/refs/tags").iterdir()) == ["v1"]
    finally:
        params["publish"]["max_action_error"] = 2.0
        (project / "params.yaml").write_text(yaml.safe_dump(params))


def test_the_release_pulls_and_serves_robot_vectors(released, robot_dataset, tmp_path):
    from websockets.sync.client import connect

    from lingbot.policy.server import packb, unpackb

    project, _ = released
    pulled = tmp_path / "policy"
    subprocess.run([sys.executable, "-m", "lingbot.cli", "pull", "lingbot/aloha-towel@v1", "--dir", str(pulled),
                    "--local-hub", str(project / "hub")], check=True, capture_output=True, cwd=REPO)
    server = subprocess.Popen([sys.executable, "-m", "lingbot.cli", "serve", "--policy", str(pulled), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        url = json.loads(server.stdout.readline())["listening"]
        with connect(url, max_size=None) as ws:
            meta = unpackb(ws.recv())
            assert meta["action_dim"] == DOF and meta["cameras"] == list(CAMERAS)
            assert meta["robot"]["action_names"] == robot_dataset[1]  # the channels, named in vector order
            observation = {**{key: np.zeros((H, W, 3), np.uint8) for key in CAMERAS},
                           "observation.state": np.zeros(STATE, np.float32), "task": TASKS[0]}
            ws.send(packb(observation))
            reply = unpackb(ws.recv())
        assert reply["actions"].shape == (4, DOF) and np.isfinite(reply["actions"]).all()
    finally:
        server.terminate()
        server.wait(timeout=30)
