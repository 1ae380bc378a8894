import dataclasses
import hashlib

import numpy as np
import pyarrow.parquet as pq

from lingbot.data.collect import collect
from lingbot.sim.metaworld import MetaWorldEnv


def _parquet_digest(root):
    files = sorted((root / "data").rglob("*.parquet"))
    assert files
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_collect_writes_a_lerobot_dataset(collected, tiny_config):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root, report = collected
    cfg = tiny_config.collect
    assert report["episodes"] == cfg.episodes * len(cfg.tasks)
    assert report["kept_per_task"] == {t: cfg.episodes for t in cfg.tasks}
    # Read it back through LeRobot's own API, decoding video with PyAV.
    ds = LeRobotDataset("lingbot/test", root=root, video_backend="pyav")
    assert ds.meta.total_episodes == report["episodes"]
    assert ds.meta.total_frames == report["frames"] == len(ds)
    assert ds.fps == 40
    assert sorted(ds.meta.video_keys) == sorted(f"observation.images.{c}" for c in cfg.cameras)
    item = ds[5]
    assert item["observation.state"].shape == (4,)
    assert item["action"].shape == (4,)
    image = item[f"observation.images.{cfg.cameras[0]}"]
    assert tuple(image.shape) == (3, cfg.image_size, cfg.image_size)
    assert 0.05 < float(image.mean()) < 0.95  # a rendered scene, not a black or white frame
    assert set(ds.meta.tasks.index) == {"open the drawer", "close the drawer"}
    actions = np.asarray(ds.hf_dataset["action"])
    assert np.abs(actions).max() <= 1.0


def test_collect_is_reproducible(tmp_path, tiny_config):
    cfg = dataclasses.replace(tiny_config.collect, tasks=("drawer-close-v3",), episodes=1, workers=1)
    collect(cfg, tmp_path / "a", progress=False)
    collect(cfg, tmp_path / "b", progress=False)
    assert _parquet_digest(tmp_path / "a") == _parquet_digest(tmp_path / "b")
    other = dataclasses.replace(cfg, seed=1)
    collect(other, tmp_path / "c", progress=False)
    assert _parquet_digest(tmp_path / "a") != _parquet_digest(tmp_path / "c")


def test_cameras_are_upright():
    """MuJoCo's corner cameras have their image 'up' axis pointing at the floor; ours are turned 180 deg.

    A camera's image-up is its +y axis (cam_xmat column 1); after our rotation it is -y. For every camera
    the image-up must not point downwards in the world (z component >= 0).
    """
    import mujoco

    from lingbot.sim.metaworld import ROTATED_CAMERAS

    cameras = ("corner", "corner2", "corner3", "topview", "gripperPOV")
    env = MetaWorldEnv("drawer-open-v3", 32, cameras)
    env.reset(0)
    model, data = env.env.model, env.env.data
    for name in cameras:
        cam = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name)
        image_up = data.cam_xmat[cam].reshape(3, 3)[:, 1] * (-1 if name in ROTATED_CAMERAS else 1)
        assert image_up[2] >= -1e-6, f"{name} renders upside down"
    # And the rendered pixels are the raw render turned by 180 degrees.
    raw = mujoco.Renderer(model, 32, 32)
    raw.scene.flags[:] = env.renderer.scene.flags
    raw.update_scene(data, camera="corner3")
    np.testing.assert_array_equal(env.render()["corner3"], raw.render()[::-1, ::-1])
    raw.close()
    env.close()


def test_collect_report_counts_frames(collected):
    root, report = collected
    table = pq.read_table(next((root / "data").rglob("*.parquet")))
    assert table.num_rows == report["frames"]
    assert report["episodes_dropped"] >= 0


def _press_episode(presses: int, seed: int = 3):
    """Roll the button-press-twice expert (made to press `presses` times) without rendering."""
    from lingbot.sim.metaworld import PressTwiceExpert

    env = MetaWorldEnv("button-press-twice", 32, ("corner3",))
    expert = PressTwiceExpert(presses)
    obs = env.reset(seed)
    expert.reset(obs)
    steps, success = [], False
    for _ in range(env.max_path_length // 2):
        action = np.clip(expert.get_action(obs), -1.0, 1.0)
        steps.append((expert.phase, obs[:4].copy(), action))
        obs, success = env.step(action, 2)
        if success:
            break
    counted = env.counter.presses
    env.close()
    return steps, success, counted


def test_button_press_twice_counts_presses():
    steps, success, counted = _press_episode(2)
    assert success and counted == 2
    assert len(steps) < 125  # well inside the evaluation's 250 steps
    # Home after one press, or a third press, is a failure, however the hand ends up.
    for presses in (1, 3):
        _, success, counted = _press_episode(presses)
        assert not success and counted == presses


def test_button_press_twice_needs_memory():
    """Where the expert decides to press again or to leave, the robot state is the same: only the
    history tells the two apart (a single-frame policy cannot, by construction)."""
    steps, _, _ = _press_episode(2)
    decisions = [i for i in range(1, len(steps)) if steps[i - 1][0] == "lift" and steps[i][0] != "lift"]
    assert [steps[i][0] for i in decisions] == ["press", "back"]
    (_, state_a, action_a), (_, state_b, action_b) = (steps[i] for i in decisions)
    assert np.abs(state_a - state_b).max() < 0.015  # metres: the same place over the button (strokes: 10 cm)
    assert action_a[2] < -0.5 and abs(action_a[1]) < 0.2  # down onto the button again
    assert action_b[1] < -0.5 and abs(action_b[2]) < 0.3  # back towards the robot, at hover height


def test_press_counter_reads_the_button_travel():
    from lingbot.sim.metaworld import PressCounter

    counter, obs = PressCounter(), np.zeros(39)
    obs[6] = 1.0  # the button's rest height
    counter.reset(obs)
    # travel (metres down): press, release, a spring-back above rest and home again, press, release
    counts = []
    for travel in (0.0, 0.03, 0.06, 0.045, 0.0, -0.04, -0.01, 0.0, 0.03, 0.05, 0.03):
        obs[6] = 1.0 - travel
        counter.update(obs)
        counts.append((counter.presses, counter.pressed))
    assert counts == [(0, False), (1, True), (1, True), (1, False), (1, False), (1, False), (1, False),
                      (1, False), (2, True), (2, True), (2, False)]
    assert counter.update(obs)  # two presses, released, and the hand never left home
    obs[:3] = 0.2
    counter.update(obs)
    assert counter.success  # it stays a success once reached


class _ExpertSession:
    """The button-press-twice expert (made to press `presses` times) as an evaluate policy session."""

    def __init__(self, presses: int):
        from lingbot.sim.metaworld import PressTwiceExpert

        self.expert, self.latency_ms = PressTwiceExpert(presses), []

    def infer(self, observation):
        state = observation["observation.state"]
        if not self.latency_ms:
            self.expert.reset(state)
        self.latency_ms.append(0.0)
        return self.expert.get_action(state)[None]

    def close(self):
        pass


class _ExpertPolicy:
    """The expert behind evaluate's policy interface. It reads the full MetaWorld observation, so the
    test widens the evaluated state to all of it."""

    cameras = ["observation.images.corner3"]
    state_key = "observation.state"
    meta = {"image_size": [32, 32], "fps": 40}

    def __init__(self, presses: int):
        self.presses = presses

    def new_session(self, task, seed):
        return _ExpertSession(self.presses)


def test_evaluate_records_the_presses_of_a_memory_task(monkeypatch):
    from lingbot.config import EvalConfig
    from lingbot.sim import evaluate as sim_evaluate
    from lingbot.sim import metaworld

    monkeypatch.setattr(metaworld, "STATE_DIM", 39)
    cfg = EvalConfig(tasks=("button-press-twice",), max_steps=125)
    results = [sim_evaluate.run_episode(_ExpertPolicy(presses), "button-press-twice", 3, cfg)
               for presses in (1, 2, 3)]
    assert [(r["presses"], r["success"]) for r in results] == [(1, False), (2, True), (3, False)]
    summary = sim_evaluate.summarize(results + [dict(results[2], presses=5)], cfg.tasks)
    assert [summary[f"button-press-twice/episodes_{n}_presses"] for n in range(4)] == [0, 1, 1, 2]
    # Tasks without a press counter have no press metrics.
    plain = [{k: v for k, v in r.items() if k != "presses"} | {"task": "drawer-open-v3"} for r in results]
    assert not any("presses" in key for key in sim_evaluate.summarize(plain, ("drawer-open-v3",)))


def test_the_recorded_frames_are_the_renders_evaluation_sees(tmp_path, tiny_config):
    """collect's video round trip (H.264 4:4:4, crf 0) gives back the raw renders within the RGB <-> YUV
    rounding: at most 3 levels off and above 45 dB (LeRobot's default AV1 4:2:0 at crf 30: ~30 dB, and
    22 dB on the moving pixels)."""
    from lingbot.data.collect import attempt_seed, rollout_expert
    from lingbot.data.lerobot_io import iter_episode_frames, open_layout

    cfg = dataclasses.replace(tiny_config.collect, tasks=("drawer-close-v3",), episodes=1, workers=1)
    collect(cfg, tmp_path / "ds", progress=False)
    attempt = 0
    while not (episode := rollout_expert("drawer-close-v3", attempt_seed(cfg.seed, "drawer-close-v3", attempt), cfg)).success:
        attempt += 1
    layout = open_layout(tmp_path / "ds")
    for cam in cfg.cameras:
        ((_, frames, error),) = list(iter_episode_frames(layout, f"observation.images.{cam}", [0]))
        assert error is None
        raw = episode.images[cam]
        assert frames.shape == raw.shape
        diff = frames.astype(np.int16) - raw.astype(np.int16)
        psnr = 10 * np.log10(255.0**2 / np.mean(diff.astype(np.float64) ** 2))
        assert np.abs(diff).max() <= 3 and psnr > 45, (cam, np.abs(diff).max(), psnr)
    ds = pq.read_table(sorted((tmp_path / "ds" / "data").rglob("*.parquet"))[0])
    objects = np.stack(ds.column("observation.environment_state").to_numpy(zero_copy_only=False))
    assert objects.shape == (len(raw), 6) and np.allclose(objects, episode.objects)


def test_collect_refuses_an_unknown_encoder(tmp_path, tiny_config):
    import pytest

    from lingbot.errors import LingbotError

    cfg = dataclasses.replace(tiny_config.collect, pix_fmt="yuv999p")
    with pytest.raises(LingbotError, match="collect: video_codec 'h264' / pix_fmt 'yuv999p'"):
        collect(cfg, tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists()
