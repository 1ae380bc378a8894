"""Shared fixtures: one tiny collected + ingested dataset per test session, copied before corruption."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[1]


def dvc(workdir, *args, check=True):
    """`dvc <args>` in `workdir`; a failure quotes its output."""
    import subprocess

    proc = subprocess.run(["dvc", *args], cwd=workdir, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def new_project(tmp_path_factory, name: str, params: dict) -> Path:
    """A fresh DVC project of the real dvc.yaml, stages and library, with `params` as params.yaml."""
    import yaml

    if shutil.which("dvc") is None:
        pytest.fail("dvc is not on PATH: run the tests through .ci/env")
    work = tmp_path_factory.mktemp(name)
    for part in ("lingbot", "stages", "baselines"):
        shutil.copytree(REPO / part, work / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / part, work / part)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    dvc(work, "init", "--no-scm", "-q")
    dvc(work, "config", "core.analytics", "false")
    return work


@pytest.fixture(scope="session")
def tiny_config():
    from lingbot.config import preset

    return preset("tiny")


@pytest.fixture(scope="session")
def collected(tmp_path_factory, tiny_config) -> tuple[Path, dict]:
    """A tiny scripted-expert dataset (2 tasks x 2 episodes, 32x32, 2 cameras) and collect's report."""
    from lingbot.data.collect import collect

    out = tmp_path_factory.mktemp("collected") / "dataset"
    report = collect(tiny_config.collect, out, progress=False)
    return out, report


@pytest.fixture(scope="session")
def ingested(tmp_path_factory, collected, tiny_config) -> Path:
    from lingbot.data.ingest import ingest

    out = tmp_path_factory.mktemp("ingested") / "demos"
    ingest(dataclasses.replace(tiny_config.ingest, source=str(collected[0])), out)
    return out


@pytest.fixture
def demos_copy(ingested, tmp_path) -> Path:
    """A private copy of the ingested directory, free to corrupt."""
    target = tmp_path / "demos"
    shutil.copytree(ingested, target)
    return target


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory, ingested, tiny_config) -> Path:
    """The tiny VAE, briefly trained on the tiny dataset."""
    from lingbot.vae.fit import fit_vae

    out = tmp_path_factory.mktemp("models") / "vae"
    fit_vae(tiny_config.vae, ingested, out, progress=False)
    return out


@pytest.fixture(scope="session")
def latent_cache(tmp_path_factory, ingested, vae_dir) -> Path:
    """The tiny dataset encoded by the tiny VAE, two episodes per shard."""
    from lingbot.config import LatentsConfig
    from lingbot.data.latents import build_cache

    out = tmp_path_factory.mktemp("train-cache") / "latents"
    build_cache(ingested, vae_dir, out, LatentsConfig(episodes_per_shard=2), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, latent_cache, vae_dir, tiny_config) -> Path:
    """A policy bundle of the tiny world model after a few training steps (weights no longer zero-headed)."""
    from lingbot.policy.bundle import write_bundle
    from lingbot.train.loop import train

    run = tmp_path_factory.mktemp("bundle-run") / "run"
    cfg = dataclasses.replace(tiny_config.pretrain, steps=3, batch_size=2, warmup=1, checkpoint_every=3)
    train(cfg, tiny_config.model, latent_cache, run, progress=False)
    out = tmp_path_factory.mktemp("bundle") / "policy"
    write_bundle(out, run / "checkpoint", vae_dir, latent_cache, tiny_config.policy)
    return out


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One temporary Prefect home and server for the session (the first start migrates its database)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    patch.setenv("DO_NOT_TRACK", "1")
    patch.setenv("DVC_NO_ANALYTICS", "1")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
    patch.undo()
