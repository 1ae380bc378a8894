"""The data stages on a Dask cluster through Prefect (lingbot/cluster.py): collect, cache_latents and
evaluate give the same bytes and scores as one process, a dead worker's job is rescheduled, a rerun
encodes only the missing shards."""

import dataclasses
import json
import os
from pathlib import Path

import pytest

from lingbot.config import ClusterConfig, EvalConfig, LatentsConfig

LOCAL_2 = ClusterConfig(workers=2)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def single_process_cache(ingested, vae_dir, tmp_path_factory):
    from lingbot.data.latents import build_cache

    out = tmp_path_factory.mktemp("cache-1") / "latents"
    build_cache(ingested, vae_dir, out, LatentsConfig(episodes_per_shard=1), progress=False)
    return out


def test_cache_on_two_workers_is_byte_identical_and_resumes(prefect_api, ingested, vae_dir, single_process_cache,
                                                            tmp_path):
    from lingbot.data.latents import build_cache_on_cluster

    out = tmp_path / "latents"
    report = build_cache_on_cluster(ingested, vae_dir, out, LatentsConfig(episodes_per_shard=1), LOCAL_2, threads=1)
    assert report["shards"] == 4 and report["shards_written"] == 4
    assert _tree(out) == _tree(single_process_cache)
    # A worker lost with its shard: the rerun encodes that shard only, to the same bytes.
    (out / "shard-00002.safetensors").unlink()
    again = build_cache_on_cluster(ingested, vae_dir, out, LatentsConfig(episodes_per_shard=1), LOCAL_2, threads=1)
    assert again["shards_written"] == 1 and _tree(out) == _tree(single_process_cache)


def die_once(marker: str, value: int) -> int:
    """A job whose first attempt kills its worker process (as an OOM kill or a lost node would)."""
    if value == 2 and not os.path.exists(marker):
        Path(marker).write_text("died")
        os._exit(1)
    return value * 10


def test_a_killed_worker_loses_only_its_job(prefect_api, tmp_path):
    from lingbot.cluster import fan_out

    marker = str(tmp_path / "died")
    assert fan_out(die_once, [(marker, i) for i in range(5)], LOCAL_2, "die-once") == [0, 10, 20, 30, 40]
    assert Path(marker).read_text() == "died"  # the job ran twice: once on the worker that died


def test_evaluate_on_two_workers_scores_as_the_local_pool(prefect_api, tiny_bundle, tmp_path):
    from lingbot.sim.evaluate import evaluate

    cfg = EvalConfig(tasks=("drawer-open-v3",), episodes=2, max_steps=8, workers=1, videos=0)
    local = evaluate(tiny_bundle, cfg, tmp_path / "local", progress=False)
    spread = evaluate(tiny_bundle, cfg, tmp_path / "cluster", progress=False, cluster=LOCAL_2)
    assert (tmp_path / "local" / "episodes.json").read_bytes() == (tmp_path / "cluster" / "episodes.json").read_bytes()
    assert {k: v for k, v in local.items() if "latency" not in k and "hz" not in k} == \
        {k: v for k, v in spread.items() if "latency" not in k and "hz" not in k}
    assert json.loads((tmp_path / "cluster" / "episodes.json").read_text())[1]["seed"] == cfg.seed + 1


def test_collect_on_two_workers_writes_the_same_dataset(prefect_api, collected, tiny_config, tmp_path):
    from lingbot.data.collect import collect

    report = collect(tiny_config.collect, tmp_path / "collected", progress=False, cluster=LOCAL_2)
    assert report["episodes"] == collected[1]["episodes"]
    assert _tree(tmp_path / "collected") == _tree(collected[0])
