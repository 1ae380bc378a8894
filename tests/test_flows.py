"""Prefect flows against a temporary Prefect server (prefect_test_harness), with real DVC runs.

- the pipeline flow on a tiny copy of the real project (collect -> ingest -> validate, real stages);
- small DVC projects whose stages are a few lines of Python (a flaky collect, a crashing evaluate, an
  evaluate that writes a chosen eval.json next to a real tiny policy bundle): the flows only
  orchestrate, so these reach every path of theirs in seconds. The retraining rounds publish real
  releases into a local hub through the real publish stage, and re-evaluate one in simulation;
- prefect.yaml deployed with `prefect deploy`, and a run of it executed by a process worker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from test_pipeline import TINY_PARAMS


def _read_run(state) -> dict:
    """What the server recorded of a flow run: its task runs (by start), logs and artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs reach the server in batches
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), sort=LogSort.TIMESTAMP_ASC)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run_id])))
    tasks = sorted(tasks, key=lambda t: t.start_time)
    return {"tasks": tasks, "logs": [log.message for log in logs], "artifacts": {a.key: a for a in artifacts}}


def _init_dvc(work):
    for args in (("init", "--no-scm", "-q"), ("config", "core.analytics", "false")):
        subprocess.run(["dvc", *args], cwd=work, check=True, capture_output=True)


# --- small DVC projects: the orchestration paths in seconds -----------------------------------------------

# Declared out of order on purpose (publish first): the flow must follow the deps, not the file. The toy
# stages read their settings from toy.yaml; params.yaml is a valid lingbot params file (publish target).
TOY_DVC = {
    "stages": {
        "publish": {
            "cmd": "python step.py publish",
            "deps": ["reports/eval.json", "models/policy"],
            "metrics": [{"reports/publish.json": {"cache": False}}],
        },
        "evaluate": {
            "cmd": "python step.py evaluate",
            "deps": ["data/demos"],
            "params": [{"toy.yaml": ["evaluate"]}],
            "outs": ["models/policy"],
            "metrics": [{"reports/eval.json": {"cache": False}}],
        },
        "collect": {"cmd": "python step.py collect", "params": [{"toy.yaml": ["collect"]}],
                    "outs": ["data/collected"]},
        "ingest": {"cmd": "python step.py ingest", "deps": ["data/collected"], "outs": ["data/demos"]},
    }
}
TOY_STEP = """
import hashlib, json, pathlib, shutil, sys, yaml
stage = sys.argv[1]
toy = yaml.safe_load(open("toy.yaml"))
if stage == "collect":
    tries = pathlib.Path("collect-attempts.txt")  # outside DVC: counts the attempts across retries
    n = int(tries.read_text()) + 1 if tries.exists() else 1
    tries.write_text(str(n))
    print(f"collect attempt {n}")
    if n <= toy["collect"]["fail_first"]:
        sys.exit("simulation worker died")
    pathlib.Path("data/collected").mkdir(parents=True)
    pathlib.Path("data/collected/episodes.txt").write_text("".join(f"ep{i}\\n" for i in range(toy["collect"]["episodes"])))
elif stage == "ingest":  # the ingest contract: lingbot.json (source, fingerprint), split.json, stats.json
    episodes = pathlib.Path("data/collected/episodes.txt").read_bytes()
    out = pathlib.Path("data/demos")
    out.mkdir(parents=True)
    (out / "lingbot.json").write_text(json.dumps({
        "source": {"spec": "data/collected", "repo_id": None, "revision": None, "commit": None},
        "fingerprint": hashlib.sha256(episodes).hexdigest(), "episodes": episodes.count(b"\\n")}))
    (out / "split.json").write_text(json.dumps({"train": [0], "val": []}))
    (out / "stats.json").write_text("{}")
elif stage == "evaluate":  # stands in for training + evaluation: a policy bundle and its eval.json
    if toy["evaluate"]["crash"]:
        sys.exit("evaluate: policy bundle is broken")
    policy = pathlib.Path("models/policy")
    if toy["evaluate"].get("bundle"):
        from lingbot.data.latents import demos_fingerprint
        shutil.copytree(toy["evaluate"]["bundle"], policy)
        meta = json.loads((policy / "policy.json").read_text())
        meta["provenance"]["cache"]["dataset"] = demos_fingerprint(pathlib.Path("data/demos"))  # trained on these
        (policy / "policy.json").write_text(json.dumps(meta))
    else:
        policy.mkdir(parents=True)
    pathlib.Path("reports").mkdir(exist_ok=True)
    pathlib.Path("reports/eval.json").write_text(json.dumps(toy["evaluate"]["metrics"]))
elif stage == "publish":
    pathlib.Path("reports/publish.json").write_text(json.dumps({"version": 1, "files": 9, "bytes": 1234}))
"""
TOY_METRICS = {"success_rate": 0.8, "success_ci_low": 0.49, "success_ci_high": 0.94, "episodes": 10,
               "latency_ms_mean": 41.5, "open the drawer/success_rate": 0.8, "open the drawer/episodes": 10}


def _toy_project(root, fail_first=0, crash=False, episodes=2, metrics=TOY_METRICS, bundle=None,
                 publish=None):
    """A toy DVC project; `publish`: a publish config (then the real `stages.publish` releases)."""
    root.mkdir()
    dvc = json.loads(json.dumps(TOY_DVC))
    params = {"preset": "tiny", "publish": {"repo_id": "lingbot/toy", "target": "hub"}}
    if publish is not None:
        dvc["stages"]["publish"]["cmd"] = "python -m stages.publish"
        params["publish"] = publish
        (root / "stages").mkdir()
        for name in ("__init__.py", "publish.py"):
            shutil.copy(REPO / "stages" / name, root / "stages" / name)
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    (root / "step.py").write_text(TOY_STEP)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    _set_toy(root, fail_first=fail_first, crash=crash, episodes=episodes, metrics=metrics, bundle=bundle)
    _init_dvc(root)
    return root


def _set_toy(root, fail_first=0, crash=False, episodes=2, metrics=TOY_METRICS, bundle=None):
    toy = {"collect": {"fail_first": fail_first, "episodes": episodes},
           "evaluate": {"crash": crash, "metrics": metrics, "bundle": bundle and str(bundle)}}
    (root / "toy.yaml").write_text(yaml.safe_dump(toy))


def test_stage_order_follows_the_dag(prefect_api, tmp_path):
    from flows.pipeline import stage_graph, stage_order

    project = _toy_project(tmp_path / "toy")
    assert stage_graph(project)["publish"] == ["evaluate"]  # through reports/eval.json and models/policy
    assert stage_order(project) == ["collect", "ingest", "evaluate", "publish"]
    assert stage_order(project, target="evaluate") == ["collect", "ingest", "evaluate"]
    assert stage_order(project, stages=["publish", "ingest"]) == ["ingest", "publish"]
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        stage_order(project, target="train")
    # the real dvc.yaml: the documented chain (publish, once declared, comes last)
    real = stage_order(REPO)
    chain = ["collect", "ingest", "validate", "fit_vae", "cache_latents", "pretrain", "finetune", "evaluate",
             "publish"]
    # score_vae (what the VAE keeps of the objects) hangs off fit_vae; nothing depends on it
    assert real.index("score_vae") > real.index("fit_vae") and sorted(stage_graph(REPO)["score_vae"]) == ["fit_vae", "ingest"]
    real = [s for s in real if s != "score_vae"]
    assert real == [s for s in chain if s in real] and real[:8] == chain[:8]


def test_pipeline_retries_logs_and_artifacts(prefect_api, tmp_path):
    from flows.pipeline import pipeline

    project = _toy_project(tmp_path / "toy", fail_first=1)
    state = pipeline(project_dir=str(project), retries={"collect": 1}, retry_delay_seconds=0, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert [r["stage"] for r in result["stages"]] == ["collect", "ingest", "evaluate", "publish"]
    assert all(r["ran"] for r in result["stages"])
    assert result["metrics"] == TOY_METRICS
    assert result["release"] == {"repo_id": "lingbot/toy", "tag": "v1", "target": "hub", "version": 1, "files": 9,
                                 "bytes": 1234, "url": "https://huggingface.co/lingbot/toy/tree/v1"}

    run = _read_run(state)
    assert [t.name for t in run["tasks"]][:4] == ["collect", "ingest", "evaluate", "publish"]
    collect = run["tasks"][0]
    assert collect.run_count == 2 and (project / "collect-attempts.txt").read_text() == "2"  # one retry
    assert "collect | simulation worker died" in run["logs"]
    assert "collect | collect attempt 2" in run["logs"]
    assert "collect | Running stage 'collect':" in run["logs"]

    table = run["artifacts"]["lingbot-eval"]
    assert table.type == "table"
    rows = json.loads(table.data)
    assert rows[0] == {"metric": "success_rate", "value": 0.8}
    assert {r["metric"]: r["value"] for r in rows} == TOY_METRICS
    assert ["/" in r["metric"] for r in rows] == [False] * 5 + [True] * 2  # per-task rows after the overall ones
    report = run["artifacts"]["lingbot-pipeline-report"]
    assert report.type == "markdown"
    assert "[lingbot/toy@v1](https://huggingface.co/lingbot/toy/tree/v1)" in report.data
    assert "success_rate 0.8" in report.data

    again = pipeline(project_dir=str(project), retry_delay_seconds=0)
    assert [r["ran"] for r in again["stages"]] == [False] * 4  # DVC's cache, not Prefect's, decides


def test_failing_stage_fails_the_flow_naming_it(prefect_api, tmp_path):
    from flows.pipeline import StageFailed, pipeline

    project = _toy_project(tmp_path / "toy", crash=True)
    state = pipeline(project_dir=str(project), retry_delay_seconds=0, return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match=r"stage 'evaluate' failed: dvc repro evaluate exited \d+") as error:
        state.result()
    assert "evaluate: policy bundle is broken" in str(error.value)  # the stage's own last words
    run = _read_run(state)
    names = [t.name for t in run["tasks"]]
    assert "publish" not in names and names[:3] == ["collect", "ingest", "evaluate"]
    assert not (project / "reports" / "publish.json").exists()
    report = run["artifacts"]["lingbot-pipeline-report"].data
    assert "**Failed at stage `evaluate`**" in report
    assert "lingbot-eval" not in run["artifacts"]


# --- the real project, first stages on the tiny params ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory):
    """A copy of the project (code, dvc.yaml) with the tiny params in a separate file."""
    work = tmp_path_factory.mktemp("flow-project")
    for name in ("lingbot", "stages"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    (work / "tiny.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    _init_dvc(work)
    return work


def test_pipeline_runs_the_real_stages_up_to_validate(prefect_api, tiny_project):
    from flows.pipeline import pipeline

    state = pipeline(project_dir=str(tiny_project), target="validate", params_file="tiny.yaml",
                     return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert [(r["stage"], r["ran"]) for r in result["stages"]] == [("collect", True), ("ingest", True),
                                                                  ("validate", True)]
    assert yaml.safe_load((tiny_project / "params.yaml").read_text()) == TINY_PARAMS
    lock = yaml.safe_load((tiny_project / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"collect", "ingest", "validate"}
    assert lock["collect"]["params"]["params.yaml"]["collect"] == {"episodes": 2}
    assert json.loads((tiny_project / "reports" / "validate.json").read_text())["success"] is True
    run = _read_run(state)
    assert [t.name for t in run["tasks"]][:3] == ["collect", "ingest", "validate"]
    assert any(m.startswith("validate | validation passed:") for m in run["logs"])
    report = run["artifacts"]["lingbot-pipeline-report"].data
    assert "No release: the publish stage was not part of this run." in report
    assert "lingbot-eval" not in run["artifacts"]


def test_workers_share_outputs_through_the_dvc_remote(prefect_api, tmp_path):
    """Scale-out: a fresh worker with the committed dvc.lock restores outputs from the remote, runs nothing."""
    from flows.pipeline import pipeline

    remote = tmp_path / "remote"
    first = _toy_project(tmp_path / "first")
    subprocess.run(["dvc", "remote", "add", "-d", "shared", str(remote)], cwd=first, check=True, capture_output=True)
    pipeline(project_dir=str(first), target="evaluate", push=True, retry_delay_seconds=0)
    fresh = tmp_path / "fresh"  # what a git checkout holds: code, params, dvc.lock, metrics; no data, no cache
    fresh.mkdir()
    for name in ("dvc.yaml", "dvc.lock", "params.yaml", "toy.yaml", "step.py", ".dvc/config", "reports/eval.json"):
        (fresh / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(first / name, fresh / name)
    result = pipeline(project_dir=str(fresh), target="evaluate", pull=True, retry_delay_seconds=0)
    assert [(r["stage"], r["ran"]) for r in result["stages"]] == [("collect", False), ("ingest", False),
                                                                  ("evaluate", False)]
    assert not (fresh / "collect-attempts.txt").exists()  # collect never ran here
    assert (fresh / "data" / "demos" / "lingbot.json").read_text() == (first / "data" / "demos" / "lingbot.json").read_text()


# --- the retraining loop ---------------------------------------------------------------------------------


def _eval(rate, episodes=2, task="drawer-open-v3"):
    """An eval.json as stage evaluate writes it (the tiny preset evaluates drawer-open-v3 over 2 episodes)."""
    return {"success_rate": rate, "success_ci_low": 0.0, "success_ci_high": 1.0, "episodes": episodes,
            "latency_ms_mean": 40.0, f"{task}/success_rate": rate, f"{task}/episodes": episodes}


def test_decide_publishes_only_a_strictly_better_candidate():
    from flows.retrain import decide

    assert decide(_eval(0.5), None).action == "publish"  # first release
    assert decide(_eval(0.6), _eval(0.5), current_tag="v1").action == "publish"
    tie = decide(_eval(0.5), _eval(0.5), current_tag="v1")
    assert tie.action == "keep" and tie.reason.startswith("tie:")  # the current release wins ties
    worse = decide(_eval(0.4), _eval(0.5), current_tag="v1")
    assert (worse.action, worse.candidate, worse.current) == ("keep", 0.4, 0.5)
    gated = decide(_eval(0.6), None, min_success=0.8)
    assert gated.action == "keep" and "below publish.min_success" in gated.reason


def test_retrain_publishes_only_when_new_data_gives_a_better_policy(prefect_api, tiny_bundle, tmp_path):
    """Real hub releases of a real (tiny) policy bundle; the toy evaluate stage chooses the candidate's score."""
    from flows.retrain import retrain
    from lingbot.hub.local import LocalHub

    project = _toy_project(tmp_path / "toy", metrics=_eval(0.5), bundle=tiny_bundle,
                           publish={"repo_id": "lingbot/toy", "target": "local", "local_dir": "hub"})
    hub = LocalHub(project / "hub", "lingbot/toy")

    def round_(episodes, rate, reevaluate=False):
        _set_toy(project, episodes=episodes, metrics=_eval(rate), bundle=tiny_bundle)
        state = retrain(project_dir=str(project), reevaluate_release=reevaluate, retry_delay_seconds=0,
                        return_state=True)
        assert state.is_completed(), state.message
        return state.result(), state

    first, _ = round_(2, 0.5)
    assert (first["action"], first["new_tag"], first["current_tag"]) == ("publish", "v1", None)
    assert first["reason"].startswith("no release yet; first release")
    assert list(hub.tags()) == ["v1"]
    assert json.loads((hub.snapshot(hub.tags()["v1"]) / "eval.json").read_text()) == _eval(0.5)

    same, state = round_(2, 0.5)  # no new demonstrations: nothing after ingest runs
    assert (same["action"], same["current_tag"]) == ("skip", "v1")
    assert same["reason"].startswith("no new demonstrations: v1 was trained on these")
    run = _read_run(state)
    assert [t.name for t in run["tasks"] if t.name in TOY_DVC["stages"]] == ["collect", "ingest"]
    assert "**skip**: no new demonstrations" in run["artifacts"]["lingbot-retrain-decision"].data

    tie, _ = round_(3, 0.5)  # new demonstrations, same score: the current release stays
    assert (tie["action"], tie["candidate"], tie["current"], tie["baseline"]) == ("keep", 0.5, 0.5, "recorded")
    assert tie["reason"].startswith("new demonstrations: demos fingerprint")
    worse, _ = round_(4, 0.0)
    assert (worse["action"], worse["current_tag"]) == ("keep", "v1")
    assert list(hub.tags()) == ["v1"]

    better, state = round_(5, 1.0)
    assert (better["action"], better["new_tag"], better["current"]) == ("publish", "v2", 0.5)
    assert list(hub.tags()) == ["v1", "v2"]
    report = _read_run(state)["artifacts"]["lingbot-retrain-decision"].data
    assert "**publish**" in report and "success rate: candidate 1.000, current release 0.500 (recorded)" in report
    assert f"[lingbot/toy@v2]({(project / 'hub' / 'lingbot' / 'toy').as_uri()})" in report

    # v2 records 1.0, but on this project's seeds the released policy is evaluated again (real rollouts: the
    # tiny, barely trained policy cannot open the drawer in 12 steps), and the candidate's 0.5 beats it
    rerun, _ = round_(6, 0.5, reevaluate=True)
    assert (rerun["baseline"], rerun["current"], rerun["action"], rerun["new_tag"]) == ("re-evaluated", 0.0,
                                                                                         "publish", "v3")


# --- deployments --------------------------------------------------------------------------------------------


def test_prefect_yaml_deploys_both_flows_and_a_process_worker_runs_them(prefect_api, tmp_path):
    """`prefect deploy --all` as the README says, then a process worker picks a run of the deployment up."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "flows", checkout / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", checkout / "prefect.yaml")
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    prefect = [str(Path(sys.executable).parent / "prefect")]

    def cli(*args):
        proc = subprocess.run([*prefect, *args], cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    cli("work-pool", "create", "lingbot", "--type", "process")
    cli("--no-prompt", "deploy", "--all")
    with get_client(sync_client=True) as client:
        pipeline = client.read_deployment_by_name("lingbot-pipeline/pipeline")
        nightly = client.read_deployment_by_name("lingbot-retrain/retrain-nightly")
    assert pipeline.work_pool_name == nightly.work_pool_name == "lingbot"
    assert pipeline.schedules == [] and pipeline.parameters == {"project_dir": "."}
    assert {"target", "stages", "params_file", "retries", "pull", "push"} <= set(
        pipeline.parameter_openapi_schema["properties"])
    [schedule] = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "UTC", True)
    assert nightly.global_concurrency_limit.limit == 1
    # no pull section: the worker runs the flow in the checkout that was deployed
    assert pipeline.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
        "directory": str(checkout)}}]

    toy = _toy_project(tmp_path / "toy")
    run = run_deployment("lingbot-pipeline/pipeline", timeout=0,
                         parameters={"project_dir": str(toy), "target": "ingest", "retry_delay_seconds": 0})
    cli("worker", "start", "--pool", "lingbot", "--run-once")
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state.is_completed(), state.message
    assert json.loads((toy / "data" / "demos" / "lingbot.json").read_text())["episodes"] == 2

    # scale-out: the same deployment onto another pool with an image (README's Kubernetes recipe; the
    # pool here is a process pool, as this machine has no cluster): the image's WORKDIR is the project
    cli("work-pool", "create", "lingbot-scale", "--type", "process")
    cli("--no-prompt", "deploy", "-n", "retrain-nightly", "--pool", "lingbot-scale",
        "--job-variable", "image=registry.example/lingbot:1")
    with get_client(sync_client=True) as client:
        scaled = client.read_deployment_by_name("lingbot-retrain/retrain-nightly")
    assert (scaled.work_pool_name, scaled.job_variables) == ("lingbot-scale", {"image": "registry.example/lingbot:1"})
    assert scaled.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/prefect"}}]
    assert scaled.schedules[0].schedule.cron == "0 2 * * *"
