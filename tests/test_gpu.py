"""Measuring on a GPU machine, rehearsed on this CPU: `.ci/gpu prepare` and `.ci/gpu run --cpu` end to end.

Tiny inputs come from the suite's shared fixtures (collect -> ingest -> fit_vae -> cache_latents, tiny preset),
laid out as a project directory; prepare carries no wheels and no GL packages here (no network in
tests). One `run --cpu` covers both that every step writes its JSON and that a step stopped at an
impossible limit is reported as such while the others still run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

GPU = REPO / ".ci" / "gpu"
STEP_KEYS = {
    "train": {"device", "peak_tflops", "variants", "best_mfu", "best_samples_per_s", "best_tokens_per_s"},
    "realtime": {"device", "variants", "best_latency_ms", "best_latency_ms_half_video", "tokens_per_chunk"},
    "vae": {"psnr_db", "ssim", "steps", "seconds_per_step", "reached_28db"},
    "policy": {"world_model_success_rate", "bc_success_rate", "world_model_episodes", "bc_episodes",
               "pretrain_steps", "finetune_steps", "bc_steps"},
}


def _sh(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run([str(GPU), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def project(tmp_path_factory, ingested, vae_dir, latent_cache) -> Path:
    """A project directory holding a completed tiny chain's outputs, where prepare looks for them."""
    root = tmp_path_factory.mktemp("gpu-project")
    shutil.copytree(ingested, root / "data" / "demos")
    shutil.copytree(latent_cache, root / "data" / "latents")
    shutil.copytree(vae_dir, root / "models" / "vae")
    return root


@pytest.fixture(scope="module")
def prepared(project, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpu-folder") / "gpu"
    result = _sh("prepare", "--from", str(project), "--preset", "tiny", "--no-wheels", "--no-gl",
                 "--dir", str(folder), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left out: wheels" in result.stdout and "limit 64.00 MiB" in result.stdout
    return folder


def test_prepare_carries_the_inputs(prepared):
    record = json.loads((prepared / "prepare.json").read_text())
    assert record["total_bytes"] <= record["limit_bytes"] == 64 * 2**20
    for path in ("inputs/latents/manifest.json", "inputs/vae/config.json", "inputs/demos/stats.json",
                 "inputs/demos/split.json", "inputs/frames/frames.json"):
        assert (prepared / path).is_file(), path
    frames = json.loads((prepared / "inputs" / "frames" / "frames.json").read_text())
    assert set(record["frames"]["bc_episodes"]) <= set(frames["episodes"])
    assert frames["psnr_db_vs_dataset_frames"] > 30  # near-lossless re-encoding of the dataset's frames
    assert record["z_dim"] == 4 and record["text_dim"] == 384


def test_frame_pack_reads_like_the_dataset(prepared, ingested):
    """The carried frames decode to the dataset's own frames, episode by episode, camera-major."""
    import numpy as np

    from tools.gpu.frames import FramePack
    from lingbot.vae.fit import load_frames, read_demos

    manifest, split, layout = read_demos(ingested)
    cameras = manifest["keys"]["cameras"]
    pack = FramePack(prepared / "inputs" / "frames")
    episodes = pack.episodes[:2]
    ours, theirs = pack.load_frames(layout, cameras, episodes), load_frames(layout, cameras, episodes)
    assert [c.shape for c in ours] == [c.shape for c in theirs]
    for a, b in zip(ours, theirs):
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 3  # H.264 at crf 8 over 8-bit frames
    with pytest.raises(Exception, match="not carried"):
        pack.load_frames(layout, cameras, [10_000])


def test_prepare_refuses_over_the_limit(project, tmp_path):
    folder = tmp_path / "gpu"
    result = _sh("prepare", "--from", str(project), "--preset", "tiny", "--no-wheels", "--no-gl",
                 "--dir", str(folder), "--limit-mib", "0.5", timeout=300)
    assert result.returncode == 2
    assert "over the 0.50 MiB limit; refused" in result.stderr
    assert not folder.exists()  # nothing half-filled left behind


def test_prepare_names_missing_inputs(tmp_path):
    result = _sh("prepare", "--from", str(tmp_path), "--preset", "tiny", "--no-wheels", "--no-gl",
                 "--dir", str(tmp_path / "gpu"), timeout=120)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "data/latents/manifest.json" in line and "dvc repro" in line


def test_run_cpu_every_step_and_a_failing_one(prepared, tmp_path):
    """All four steps on tiny shapes; realtime gets an impossible limit (2 s: less than torch's import)
    and must come back as a timeout without stopping the steps after it."""
    out = tmp_path / "out"
    result = _sh("run", "--cpu", "--dir", str(prepared), "--out", str(out), "--limit", "realtime=2",
                 timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]  # one step failed
    files = sorted(p.name for p in out.iterdir())
    assert files == ["log.txt", "policy.json", "realtime.json", "summary.json", "summary.md", "train.json", "vae.json"]
    assert len(files) <= 8  # a handful of small files to copy back from the GPU machine
    steps = {name: json.loads((out / f"{name}.json").read_text()) for name in STEP_KEYS}
    assert steps["realtime"]["status"] == "timeout"
    assert steps["realtime"]["error"] == "stopped at its 2 s limit" and steps["realtime"]["wall_s"] < 15
    for name in ("train", "vae", "policy"):
        data = steps[name]
        assert data["status"] == "ok", (name, data.get("error"), data.get("traceback"))
        assert STEP_KEYS[name] <= set(data), (name, STEP_KEYS[name] - set(data))
        assert data["wall_s"] <= data["limit_s"] + 1
    assert steps["train"]["best_mfu"] > 0
    assert 0 <= steps["policy"]["world_model_success_rate"] <= 1
    assert steps["policy"]["world_model_episodes"] == steps["policy"]["bc_episodes"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu" and set(summary["steps"]) == set(STEP_KEYS)
    assert result.stdout.rstrip().endswith("|")  # the summary table is printed last
    assert "| realtime | timeout |" in (out / "summary.md").read_text()


def test_run_cpu_broken_input_is_a_failed_step(prepared, tmp_path):
    """A step whose input is broken fails with the error in its JSON; the run goes on to the next."""
    broken = tmp_path / "gpu"
    shutil.copytree(prepared, broken)
    (broken / "inputs" / "frames" / "frames.json").unlink()
    out = tmp_path / "out"
    # realtime's CPU limit (60 s) is for a quiet machine; here it only has to run after the failed step.
    result = _sh("run", "--cpu", "--dir", str(broken), "--out", str(out), "--only", "vae", "--only", "realtime",
                 "--limit", "realtime=400", timeout=600)
    assert result.returncode == 1
    vae = json.loads((out / "vae.json").read_text())
    assert vae["status"] == "failed" and "frames.json" in vae["error"]
    realtime = json.loads((out / "realtime.json").read_text())
    assert realtime["status"] == "ok"
    # Every latency variant ran, the compiled one (traced only, on a CPU) giving the bf16 weights' actions.
    variants = realtime["variants"]
    assert set(variants) == {"fp32", "bf16-autocast", "bf16-weights", "bf16-compile"}
    assert all("latency_ms_hist3" in v for v in variants.values()), variants
    assert variants["bf16-compile"]["actions_max_abs_diff_vs_fp32"] < 0.1 and variants["bf16-compile"]["compile_s"] > 0


def test_the_library_does_not_import_the_tooling():
    """The ops tooling (tools/) imports lingbot; nothing in lingbot/ imports it."""
    import re

    imports = re.compile(r"^\s*(from|import)\s+tools\b", re.M)
    hits = [str(p.relative_to(REPO)) for p in (REPO / "lingbot").rglob("*.py") if imports.search(p.read_text())]
    assert not hits
