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
    "bc": {"steps": 3, "seed": 0},
    "peers": {"budget_s": 1, "seed": 0},
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


def _git_project(project, tmp_path):
    """A copy of `project` (its DVC cache and outs) as a git repository with one commit: what DVC's
    experiments need. DVC wrote no .gitignore under --no-scm: every out of both pipelines is ignored."""
    import shutil

    work = tmp_path / "exp"
    shutil.copytree(project, work, symlinks=True)
    outs = set()
    for pipeline in ("dvc.yaml", "baselines/dvc.yaml"):
        for stage in yaml.safe_load((work / pipeline).read_text())["stages"].values():
            for item in stage.get("foreach", [None]):
                outs |= {o.replace("${item}", str(item)) for o in stage.get("do", stage).get("outs", [])}
    ignored = [*sorted(outs), "hub", ".dvc/tmp", ".dvc/cache"]
    (work / ".gitignore").write_text("".join(f"/{o}\n" for o in ignored) + "__pycache__/\n")
    _dvc(work, "config", "core.no_scm", "false")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"]):
        subprocess.run(["git", *args], cwd=work, check=True, capture_output=True)
    return work


def test_baselines_are_stages_and_a_seed_sweep_is_an_experiment(project, first_repro, tmp_path):
    """baselines/dvc.yaml trains plain BC and LeRobot's ACT on finetune's demos and rolls them out on
    evaluate's held-out episodes, after the chain's data stages and without rerunning them; another
    training seed is a DVC experiment that reuses everything upstream of fine-tuning."""
    import json

    work = _git_project(project, tmp_path)
    bc = _dvc(work, "repro", "baselines/dvc.yaml:bc")
    assert "Running stage 'baselines/dvc.yaml:bc'" in bc.stdout
    assert not any(f"Running stage '{s}'" in bc.stdout for s in STAGES)  # the chain's outs are up to date
    result = json.loads((work / "reports" / "baselines" / "bc.json").read_text())
    run = json.loads((work / "reports" / "eval.json").read_text())
    assert result["steps"] == 3 and result["demos"] == 1 and result["episodes"] == run["episodes"]
    assert "train_seconds" not in result  # a timing: beside the metrics, out of dvc.lock
    assert json.loads((work / "reports" / "baselines" / "bc.timings.json").read_text())["train_seconds"] > 0
    seeds = [[(e["task"], e["seed"]) for e in json.loads((work / "reports" / d / "episodes.json").read_text())]
             for d in ("eval", "baselines/bc")]
    assert seeds[0] == seeds[1]  # the same held-out episodes
    assert (work / "models" / "baselines" / "bc" / "bc.json").is_file()
    assert "Running stage" not in _dvc(work, "repro", "baselines/dvc.yaml:bc").stdout

    act = _dvc(work, "repro", "baselines/dvc.yaml:peer@act")
    assert "Running stage 'baselines/dvc.yaml:peer@act'" in act.stdout and "peer@diffusion" not in act.stdout
    trained = json.loads((work / "models" / "baselines" / "act" / "lingbot_peer.json").read_text())
    assert trained["steps"] == 10 and len(trained["episodes"]) == 1  # budget 1 s: the floor of 10 steps
    assert json.loads((work / "reports" / "baselines" / "act.json").read_text())["episodes"] == run["episodes"]

    # Another fine-tuning seed: only fine-tuning and what follows it run again.
    for args in (["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baselines"]):
        subprocess.run(["git", *args], cwd=work, check=True, capture_output=True)
    exp = _dvc(work, "exp", "run", "-n", "finetune-seed-1", "-S", "++finetune.seed=1")
    assert "Running stage 'finetune'" in exp.stdout and "Running stage 'evaluate'" in exp.stdout
    assert "Running stage 'pretrain'" not in exp.stdout and "dvc.yaml:bc" not in exp.stdout
    trained = json.loads((work / "models" / "finetune" / "checkpoint" / "config.json").read_text())["train"]
    assert trained["seed"] == 1
    # The quality table: the commit's run and the experiment are one recipe over two seeds for the world
    # model; BC, which the experiment did not rerun, is one run.
    import sys

    proc = subprocess.run([sys.executable, "-m", "lingbot.cli", "experiments"], cwd=work, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    table = {row["metrics"]: row for row in json.loads(proc.stdout.strip().splitlines()[-1])["recipes"]}
    assert set(table) == {"reports/eval.json", "reports/baselines/bc.json", "reports/baselines/act.json"}
    world = table["reports/eval.json"]
    assert sorted(world["runs"]) == ["finetune-seed-1", "main"] and world["episodes"] == [2, 2]
    assert world["seeds"][world["runs"].index("finetune-seed-1")]["finetune.seed"] == 1
    assert table["reports/baselines/bc.json"]["runs"] == ["main"]


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
