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
