"""Ingest takes any LeRobot v3 dataset: one written by LeRobot itself, one from the Hub (cached)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lingbot.config import IngestConfig, ValidateConfig
from lingbot.data.ingest import ingest, split_episodes
from lingbot.data.validate import validate
from lingbot.errors import LingbotError


@pytest.fixture(scope="module")
def lerobot_made(tmp_path_factory):
    """A dataset made with LeRobotDataset.create directly: other keys, fps, shapes and robot than collect."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = tmp_path_factory.mktemp("lerobot") / "so100"
    features = {
        "observation.state": {"dtype": "float32", "shape": (6,), "names": [f"joint{i}" for i in range(6)]},
        "action": {"dtype": "float32", "shape": (6,), "names": [f"joint{i}" for i in range(6)]},
        "observation.images.top": {"dtype": "video", "shape": (48, 64, 3), "names": ["height", "width", "channels"]},
    }
    ds = LeRobotDataset.create("someone/so100_pick", fps=10, features=features, root=root, robot_type="so100",
                               streaming_encoding=True)
    rng = np.random.default_rng(0)
    lengths = [12, 15, 9, 11]
    for ep, length in enumerate(lengths):
        for t in range(length):
            ds.add_frame({
                "observation.state": rng.normal(size=6).astype(np.float32),
                "action": rng.uniform(-1, 1, size=6).astype(np.float32),
                "observation.images.top": rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8),
                "task": "pick the cube" if ep % 2 == 0 else "place the cube",
            })
        ds.save_episode()
    ds.finalize()
    return root, lengths


def test_ingest_a_dataset_made_by_lerobot(lerobot_made, tmp_path):
    import pyarrow.parquet as pq

    root, lengths = lerobot_made
    out = tmp_path / "demos"
    report = ingest(IngestConfig(source=str(root), val_fraction=0.5), out)
    assert report["episodes"] == 4 and report["frames"] == sum(lengths)
    manifest = json.loads((out / "lingbot.json").read_text())
    assert manifest["fps"] == 10 and manifest["robot_type"] == "so100"
    assert manifest["keys"]["cameras"] == ["observation.images.top"]
    assert manifest["shapes"]["observation.images.top"] == [48, 64, 3]
    assert manifest["tasks"] == ["pick the cube", "place the cube"]

    split = json.loads((out / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == [0, 1, 2, 3]
    assert not set(split["train"]) & set(split["val"])
    assert len(split["val"]) == 2  # one per task at val_fraction 0.5

    # q01/q99 are measured on train frames only, per dimension.
    frames = pq.read_table(next((root / "data").rglob("*.parquet"))).to_pandas()
    train = frames[frames["episode_index"].isin(split["train"])]
    action = np.stack(train["action"].to_numpy())
    stats = json.loads((out / "stats.json").read_text())
    np.testing.assert_allclose(stats["action"]["q01"], np.quantile(action, 0.01, axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(action, 0.99, axis=0), rtol=1e-6)
    assert len(stats["observation.state"]["q01"]) == 6

    # The copied dataset is whole and passes the gate (states here are N(0,1): inside the bound).
    report = validate(out, ValidateConfig(min_episode_length=5))
    assert report["success"], report["failures_text"]


def test_ingest_from_the_hub_cache(lerobot_made, tmp_path, monkeypatch):
    """`org/name@rev` goes through huggingface_hub.snapshot_download; offline it is served from the cache."""
    root, _ = lerobot_made
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "datasets--someone--so100_pick"
    shutil.copytree(root, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "v1.0").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    out = tmp_path / "demos"
    ingest(IngestConfig(source="someone/so100_pick@v1.0"), out)
    source = json.loads((out / "lingbot.json").read_text())["source"]
    assert source == {"spec": "someone/so100_pick@v1.0", "repo_id": "someone/so100_pick",
                      "revision": "v1.0", "commit": commit}

    with pytest.raises(LingbotError, match="not in the local Hugging Face cache"):
        ingest(IngestConfig(source="someone/so100_pick@v2.0"), tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_ingest_rejects_unknown_keys_without_writing(collected, tmp_path):
    out = tmp_path / "demos"
    with pytest.raises(LingbotError, match="feature 'observation.images.wrist' not in dataset"):
        ingest(IngestConfig(source=str(collected[0]), cameras=("observation.images.wrist",)), out)
    assert not out.exists() and not list(tmp_path.glob(".demos*"))
    with pytest.raises(LingbotError, match="no such dataset directory"):
        ingest(IngestConfig(source=str(tmp_path / "nowhere")), out)


def test_split_is_stratified_and_seeded():
    tasks = {i: ("a" if i < 10 else "b") for i in range(14)}
    split = split_episodes(tasks, 0.2, seed=3)
    assert split == split_episodes(tasks, 0.2, seed=3)
    assert split != split_episodes(tasks, 0.2, seed=4)
    assert sum(1 for e in split["val"] if e < 10) == 2 and sum(1 for e in split["val"] if e >= 10) == 1


def test_cli_help_is_fast_to_import():
    """`lingbot --help` must not import the heavy stack (torch, lerobot, GX, prefect, mujoco)."""
    code = ("import sys; from lingbot.cli import build_parser; build_parser().format_help();"
            "heavy = [m for m in ('torch', 'lerobot', 'great_expectations', 'prefect', 'mujoco') if m in sys.modules];"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ingest_takes_only_the_chosen_cameras_and_links_instead_of_copying(collected, tmp_path, monkeypatch):
    root = collected[0]
    out = tmp_path / "demos"
    ingest(IngestConfig(source=str(root), cameras=("observation.images.corner3",)), out)
    assert sorted(p.name for p in (out / "dataset" / "videos").iterdir()) == ["observation.images.corner3"]
    parquet = next((root / "data").rglob("*.parquet"))
    linked = out / "dataset" / parquet.relative_to(root)
    assert linked.stat().st_ino == parquet.stat().st_ino  # a hard link: the dataset is not stored twice
    # From the Hub, only meta/, data/ and the chosen cameras' videos are downloaded.
    import huggingface_hub

    asked = {}

    def fake_download(repo_id, **kwargs):
        asked.update(kwargs)
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    ingest(IngestConfig(source="someone/metaworld@v1", cameras=("observation.images.gripperPOV",)), tmp_path / "hub")
    assert asked["revision"] == "v1"
    assert asked["allow_patterns"] == ["meta/**", "data/**", "videos/observation.images.gripperPOV/**"]


def test_ingest_takes_only_the_chosen_episodes(lerobot_made, tmp_path):
    """`ingest.episodes`: the split, stats and dataset copy hold those episodes alone, and it validates."""
    import pyarrow.parquet as pq

    from lingbot.data.lerobot_io import open_layout, read_frames

    root, lengths = lerobot_made
    out = tmp_path / "demos"
    report = ingest(IngestConfig(source=str(root), episodes="0, 2-3", val_fraction=0.5), out)
    assert report["episodes"] == 3 and report["frames"] == lengths[0] + lengths[2] + lengths[3]
    split = json.loads((out / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == [0, 2, 3]
    manifest = json.loads((out / "lingbot.json").read_text())
    assert manifest["source"]["episodes"] == "0, 2-3"
    # Stats from the chosen train episodes' frames only.
    frames = pq.read_table(next((root / "data").rglob("*.parquet"))).to_pandas()
    action = np.stack(frames[frames["episode_index"].isin(split["train"])]["action"].to_numpy())
    stats = json.loads((out / "stats.json").read_text())
    np.testing.assert_allclose(stats["action"]["mean"], action.astype(np.float64).mean(0), rtol=1e-9)
    # The copy is a consistent dataset of the 3 episodes: episode 1's rows are gone from its data table.
    copy = open_layout(out / "dataset")
    assert copy.info["total_episodes"] == 3 and copy.info["total_frames"] == report["frames"]
    assert sorted(set(read_frames(copy, ["episode_index"]).column("episode_index").to_pylist())) == [0, 2, 3]
    assert validate(out, ValidateConfig(min_episode_length=5))["success"]
    # Another choice is another dataset to everything downstream.
    ingest(IngestConfig(source=str(root), episodes="0-2", val_fraction=0.5), tmp_path / "other")
    assert json.loads((tmp_path / "other" / "lingbot.json").read_text())["fingerprint"] != manifest["fingerprint"]

    for spec, message in (("3-1", "'3-1' is not an episode index"), ("0,9", "episode 9 not in the dataset")):
        with pytest.raises(LingbotError, match=message):
            ingest(IngestConfig(source=str(root), episodes=spec), tmp_path / "bad")
        assert not (tmp_path / "bad").exists()


def test_hub_ingest_downloads_only_the_files_of_the_chosen_episodes(tmp_path, monkeypatch):
    """v3 packs episodes into files: from the Hub, meta/ first, then only the files the chosen ones are in."""
    import fnmatch

    import huggingface_hub
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    repo = tmp_path / "repo"  # the Hub's copy: one data file and one video file per camera per episode
    features = {
        "observation.state": {"dtype": "float32", "shape": (3,), "names": None},
        "action": {"dtype": "float32", "shape": (3,), "names": None},
        **{f"observation.images.{cam}": {"dtype": "video", "shape": (32, 32, 3), "names": ["height", "width", "channels"]}
           for cam in ("top", "wrist")},
    }
    ds = LeRobotDataset.create("someone/packed", fps=10, features=features, root=repo, streaming_encoding=True,
                               data_files_size_in_mb=1e-6, video_files_size_in_mb=1e-6)
    rng = np.random.default_rng(0)
    for ep in range(5):
        for _ in range(9 + ep):
            ds.add_frame({"observation.state": rng.normal(size=3).astype(np.float32),
                          "action": rng.uniform(-1, 1, 3).astype(np.float32),
                          "observation.images.top": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                          "observation.images.wrist": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                          "task": f"task {ep % 2}"})
        ds.save_episode()
    ds.finalize()
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert sum(f.startswith("data/") for f in files) == 5

    snapshot = tmp_path / "cache" / ("ab" * 20)
    asked = []

    def fake_download(repo_id, revision, allow_patterns, **kwargs):
        asked.append(allow_patterns)
        for rel in files:
            if any(fnmatch.fnmatch(rel, pattern) for pattern in allow_patterns):
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(repo / rel, snapshot / rel)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    out = tmp_path / "demos"
    report = ingest(IngestConfig(source="someone/packed@v1", episodes="1,3", cameras=("observation.images.top",),
                                 val_fraction=0.5), out)
    assert report["episodes"] == 2 and report["frames"] == 10 + 12
    assert asked[0] == ["meta/**"]
    downloaded = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    assert [f for f in downloaded if not f.startswith("meta/")] == [
        "data/chunk-000/file-001.parquet", "data/chunk-000/file-003.parquet",
        "videos/observation.images.top/chunk-000/file-001.mp4", "videos/observation.images.top/chunk-000/file-003.mp4"]
    assert json.loads((out / "lingbot.json").read_text())["source"]["commit"] == "ab" * 20
    result = validate(out, ValidateConfig(min_episode_length=5))
    assert result["success"], result["failures_text"]
