"""`dvc repro` over the real dvc.yaml and stages on a tiny params set: runs, caches, and gates."""

import subprocess

import pytest
import yaml

from conftest import REPO, dvc as _dvc, new_project

TINY_PARAMS = {
    "preset": "tiny",
    "seed": 0,
    "threads": 2,
    "collect": {"episodes": 2},
    "ingest": {"source": "data/collected", "val_fraction": 0.5},
    "validate": {"min_episode_length": 8},
    "vae": {"steps": 2},
    "latents": {"episodes_per_shard": 2},
    "model": {"depth": 2},
    "pretrain": {"steps": 2, "batch_size": 2},
    "finetune": {"steps": 2, "batch_size": 2, "tasks": ["open the drawer"], "max_episodes_per_task": 1},
    "policy": {"video_steps": 2, "video_exec_step": 1, "action_steps": 2},
    "evaluate": {"tasks": ["drawer-open-v3"], "episodes": 2, "max_steps": 8, "videos": 1},
    "publish": {"repo_id": "lingbot/tiny", "target": "local", "local_dir": "hub", "min_success": 0.0},
}
STAGES = ("collect", "ingest", "validate", "fit_vae", "score_vae", "cache_latents", "pretrain", "finetune", "evaluate", "publish")


def _new_project(tmp_path_factory, name):
    return new_project(tmp_path_factory, name, TINY_PARAMS)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return _new_project(tmp_path_factory, "project")


@pytest.fixture(scope="module")
def first_repro(project):
    """The first `dvc repro` of the tiny chain in `project`: its output and its dvc.lock."""
    return _dvc(project, "repro"), yaml.safe_load((project / "dvc.lock").read_text())


def _data_outs(lock: dict) -> dict[str, str]:
    """{path: md5} of every stage's declared outs (the data later stages read; metrics and plots, which
    carry timings, are not among them)."""
    declared = {next(iter(o)) if isinstance(o, dict) else o
                for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
                for o in stage.get("outs", [])}
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])
            if o["path"] in declared}


def test_the_tiny_chain_is_byte_identical_from_scratch(project, first_repro, tmp_path_factory):
    """Same params and code in another clean directory: every out of every stage has the same hash."""
    twin = _new_project(tmp_path_factory, "twin")
    _dvc(twin, "repro")
    first, again = _data_outs(first_repro[1]), _data_outs(yaml.safe_load((twin / "dvc.lock").read_text()))
    assert set(first) == {"data/collected", "data/demos", "reports/validation", "models/vae", "data/latents",
                          "models/pretrain", "models/finetune", "models/policy", "reports/eval"}
    assert {p: h for p, h in again.items() if first[p] != h} == {}
    # Metrics hold results only (timings sit beside them, out of DVC): the whole lock file is the same.
    assert yaml.safe_load((twin / "dvc.lock").read_text()) == first_repro[1]
    assert (twin / "reports" / "eval.timings.json").is_file() and (twin / "reports" / "collect.timings.json").is_file()
    outcome = ("success_rate", "episodes", "mean_episode_length")
    scores = [yaml.safe_load((p / "reports" / "eval.json").read_text()) for p in (project, twin)]
    assert [{k: s[k] for k in outcome} for s in scores] == [{k: scores[0][k] for k in outcome}] * 2


def test_bench_seeds_reruns_the_recipe_and_its_own_seed_reproduces_the_run(project, first_repro, tmp_path,
                                                                           monkeypatch):
    import json
    import sys

    proc = subprocess.run([sys.executable, "-m", "lingbot.cli", "bench", "seeds", "--seeds", "0,1", "--with-run",
                           "--workers", "1", "--out", str(tmp_path / "seeds")], cwd=project, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["runs"] == 3 and set(result) >= {"seed0 (dvc repro)", "seed0", "seed1", "success_std"}
    assert result["seed0"] == result["seed0 (dvc repro)"]  # the run's own seed: the run's outcome
    run, again, other = result["per_seed"]
    assert (again["pretrain_seed"], again["finetune_seed"]) == (0, 0)
    assert other["pretrain_seed"] not in (0, again["pretrain_seed"])
    # Training time is pretrain + finetune: the run's own pretraining for its seed, the one trained here
    # (kept beside it for the seed's other targets) for seed 1.
    timed = json.loads((tmp_path / "seeds" / "seed-1" / "pretrain" / "seconds.json").read_text())["seconds"]
    from lingbot.bench.quality import world_model_train_seconds
    from lingbot.config import load_run_config

    monkeypatch.chdir(project)  # the run's reports/
    run_pretrain = world_model_train_seconds(load_run_config(project / "params.yaml"))["pretrain"]
    for row, pretrain_s in ((again, run_pretrain), (other, timed)):
        assert row["finetune_seconds"] > 0 and row["latency_ms"] > 0
        assert abs(row["train_seconds"] - row["finetune_seconds"] - pretrain_s) <= 0.11
    episodes = [json.loads((tmp_path / "seeds" / "seed-0" / "drawer-open-v3" / "eval" / "episodes.json").read_text()),
                json.loads((project / "reports" / "eval" / "episodes.json").read_text())]
    assert episodes[0] == episodes[1]

    # bench bc: plain BC per chain seed beside the world model's rows (the run for seed 0, the runs above
    # for seed 1: not trained again), on the same held-out episodes.
    def bench_bc():
        proc = subprocess.run([sys.executable, "-m", "lingbot.cli", "bench", "bc", "--seeds", "0,1", "--steps", "3",
                               "--workers", "1", "--out", str(tmp_path / "seeds")], cwd=project, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    table = bench_bc()["targets"]["drawer-open-v3"]
    wins = [round(r["success_rate"] * r["episodes"]) for r in (run, other)]
    assert table["wm_wins_per_seed"] == wins and len(table["bc_wins_per_seed"]) == 2
    assert table["episodes"] == run["episodes"] and table["demos"] >= 1
    for seed in (0, 1):
        bc = json.loads((tmp_path / "seeds" / f"seed-{seed}" / "drawer-open-v3" / "bc" / "result.json").read_text())
        assert bc["steps"] == 3 and bc["episodes"] == run["episodes"]
    assert bench_bc()["targets"]["drawer-open-v3"] == table  # kept runs are read back, not redone

    # bench peers --demos: the world model's row is that few-demo recipe, fine-tuned by bench seeds from
    # the run's own pretraining (not trained again) into a run of its own beside the run on all demos
    # (not the dvc run's result); the peer trains through lerobot-train on the same episodes.
    proc = subprocess.run([sys.executable, "-m", "lingbot.cli", "bench", "peers", "--peers", "act", "--demos", "2",
                           "--budget-s", "1", "--workers", "1", "--out", str(tmp_path / "peers")], cwd=project,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    wm, act = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert (wm["method"], act["method"]) == ("lingbot world model", "LeRobot act")
    assert wm["demos"] == act["demos"] == 1  # the tiny run has one drawer-open training episode
    few = project / "models" / "seeds" / "seed-0" / "drawer-open-v3-2demos"
    kept = json.loads((few / "result.json").read_text())
    assert wm["success"] == kept["success_rate"] and wm["train_s"] == kept["train_seconds"]
    trained = json.loads((few / "finetune" / "checkpoint" / "config.json").read_text())["train"]
    assert trained["max_episodes_per_task"] == 2
    assert not (few.parent / "pretrain").exists()  # the dvc run's pretraining, reused
    assert json.loads((tmp_path / "peers/act/drawer-open-v3-2demos/result.json").read_text()) == act

    # A kept run of another recipe is an error, never read back as this one's result.
    from lingbot.bench.quality import bench_bc, bench_seeds, retarget
    from lingbot.errors import LingbotError

    other = yaml.safe_load((project / "params.yaml").read_text())
    other["finetune"]["steps"] += 1
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(LingbotError, match="fine-tuned by another recipe"):
        bench_seeds(tmp_path / "other.yaml", [1], 1, tmp_path / "seeds", False)
    with pytest.raises(LingbotError, match="trained with other steps, seed or demos than asked"):
        bench_bc(project / "params.yaml", 4, None, 1, [0, 1], [], tmp_path / "seeds")  # kept BC ran 3 steps
    with pytest.raises(LingbotError, match="--demos 0: fine-tune on at least 1 demo"):
        retarget(load_run_config(project / "params.yaml"), None, 0)


def test_repro_runs_caches_and_reruns_only_downstream(project, first_repro):
    first = first_repro[0]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert (project / "data" / "demos" / "stats.json").is_file()
    assert (project / "data" / "latents" / "manifest.json").is_file()
    assert yaml.safe_load((project / "reports" / "vae.json").read_text())["steps"] == 2
    assert yaml.safe_load((project / "reports" / "validate.json").read_text())["success"] is True
    evaluation = yaml.safe_load((project / "reports" / "eval.json").read_text())
    assert evaluation["episodes"] == 2 and 0 <= evaluation["success_rate"] <= 1
    assert (project / "hub" / "lingbot" / "tiny" / "refs" / "tags" / "v1").is_file()

    again = _dvc(project, "repro")
    assert "Running stage" not in again.stdout

    params = dict(TINY_PARAMS, ingest={"source": "data/collected", "val_fraction": 0.0})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    changed = _dvc(project, "repro")
    assert "Running stage 'collect'" not in changed.stdout
    for stage in STAGES[1:]:  # the split changed: everything downstream of ingest reruns
        assert f"Running stage '{stage}'" in changed.stdout
    assert (project / "hub" / "lingbot" / "tiny" / "refs" / "tags" / "v2").is_file()  # a new release


def test_failed_validation_stops_the_chain(project):
    params = dict(TINY_PARAMS, validate={"min_episode_length": 8, "action_max": 0.01})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    before = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["validate"]
    failed = _dvc(project, "repro", check=False)
    assert failed.returncode != 0
    assert "FAILED expect_column_values_to_be_between column=action[" in failed.stdout + failed.stderr
    after = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["validate"]
    assert after == before  # the failed stage was not recorded as done
    assert "Running stage 'fit_vae'" not in failed.stdout  # nothing downstream ran
    assert (project / "data" / "demos" / "split.json").is_file()  # upstream outputs untouched
