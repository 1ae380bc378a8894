"""Prefect flow `lingbot-pipeline`: the DVC pipeline, one task per stage, each running `dvc repro <stage>`.

DVC owns caching and versions (a stage whose inputs did not change is skipped by DVC, not by Prefect);
Prefect adds retries on the flaky stages, the stage output streamed into the run logs, and two
artifacts: a table of the evaluation metrics (`reports/eval.json`) and a markdown report linking the
release (`reports/publish.json`).

The stages and their order come from `dvc.yaml`, the one source of truth: a stage depends on another
when one of its deps is (or lies inside, or contains) one of the other's outs, metrics or plots. The
tasks run one after another: `dvc repro` holds the repository lock, so two stages never run at once.

    python -m flows.pipeline                        # serve the flow on this machine (flow.serve)
    python -c "from flows.pipeline import pipeline; pipeline(target='validate')"
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

# Stages that fail for reasons a second try cures: collect runs simulation worker processes (a MuJoCo
# or EGL worker can die), ingest may download a Hub dataset. The others are deterministic: a retry would
# only repeat the same error (a failed validation stays failed).
DEFAULT_RETRIES = {"collect": 2, "ingest": 2}
EVAL_METRICS = "reports/eval.json"
PUBLISH_REPORT = "reports/publish.json"
HEADLINE = ("success_rate", "success_ci_low", "success_ci_high", "episodes")
TAIL_LINES = 20  # lines of a failed stage's output quoted in the error


class StageFailed(RuntimeError):
    """`dvc repro <stage>` exited non-zero; the message names the stage and quotes its last lines."""


# --- the DAG, from dvc.yaml -------------------------------------------------------------------------


def _paths(entries) -> list[str]:
    """Paths of a dvc.yaml list whose items are `path` or `{path: {options}}`."""
    paths = []
    for entry in entries or []:
        paths.extend([entry] if isinstance(entry, str) else list(entry))
    return [os.path.normpath(p) for p in paths]


def _overlaps(dep: str, out: str) -> bool:
    return dep == out or dep.startswith(out + os.sep) or out.startswith(dep + os.sep)


def stage_graph(project_dir: str | Path) -> dict[str, list[str]]:
    """Each stage of `dvc.yaml` -> the stages it directly depends on, in file order."""
    path = Path(project_dir) / "dvc.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dvc.yaml (is project_dir a lingbot project?)")
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    products = {name: _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots"))
                for name, s in stages.items()}
    graph = {}
    for name, spec in stages.items():
        deps = _paths(spec.get("deps"))
        graph[name] = [other for other in stages if other != name
                       and any(_overlaps(d, o) for d in deps for o in products[other])]
    return graph


def stage_order(project_dir: str | Path, target: str | None = None, stages: list[str] | None = None) -> list[str]:
    """The stages to run, upstream first: all of them, `target` and its ancestors, or exactly `stages`.

    Topological order by deps; stages the DAG does not order keep their dvc.yaml order.
    """
    graph = stage_graph(project_dir)
    if target is not None and stages is not None:
        raise ValueError("give either target or stages, not both")
    for name in ([target] if target else []) + list(stages or []):
        if name not in graph:
            raise ValueError(f"unknown stage {name!r} (dvc.yaml has: {', '.join(graph)})")
    if stages is not None:
        wanted = set(stages)
    elif target is not None:
        wanted, todo = set(), [target]
        while todo:
            name = todo.pop()
            if name not in wanted:
                wanted.add(name)
                todo.extend(graph[name])
    else:
        wanted = set(graph)
    waiting = {name: set(graph[name]) for name in graph}
    order = []
    while waiting:
        ready = [name for name, ups in waiting.items() if not ups]
        if not ready:
            raise ValueError(f"dvc.yaml: the stages {', '.join(sorted(waiting))} depend on each other in a cycle")
        name = ready[0]  # dict order: dvc.yaml order among the ready ones
        del waiting[name]
        for ups in waiting.values():
            ups.discard(name)
        if name in wanted:
            order.append(name)
    return order


# --- tasks ----------------------------------------------------------------------------------------------


def _dvc_env() -> dict[str, str]:
    """The stage commands (`python -m stages.x`) run in this interpreter's environment, telemetry off."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def _dvc_command() -> list[str]:
    here = Path(sys.executable).parent / "dvc"
    if here.is_file():
        return [str(here)]
    found = shutil.which("dvc")
    return [found] if found else [sys.executable, "-m", "dvc"]


def stream_command(command: list[str], cwd: str, label: str, failure: str) -> list[str]:
    """Run `command` in `cwd`, its output streamed into the run log as `label | line`; return its lines.

    A non-zero exit raises StageFailed: `failure`, the exit status, and the last lines of the output.
    """
    logger = get_run_logger()
    start = time.monotonic()
    lines: list[str] = []
    with subprocess.Popen(command, cwd=cwd, env=_dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", bufsize=1) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                # DVC's own failure lines are errors; everything else (the stage's output) is info
                (logger.error if line.startswith("ERROR") else logger.info)("%s | %s", label, line)
                lines.append(line)
    if proc.returncode != 0:
        quoted = "\n".join(lines[-TAIL_LINES:])
        raise StageFailed(f"{failure} exited {proc.returncode} after {time.monotonic() - start:.1f} s; "
                          f"its last lines:\n{quoted}")
    return lines


@task(cache_policy=NO_CACHE)
def repro_stage(project_dir: str, stage: str, force: bool = False, pull: bool = False) -> dict:
    """`dvc repro <stage>` in the project, its output into the run log.

    `force`: run it even if unchanged (`--force --single-item`: its upstream is not forced). `pull`:
    missing outputs come from the DVC remote (`--pull`): a fresh worker with the committed dvc.lock
    restores what another one computed instead of recomputing it.
    """
    args = ["repro", *(["--force", "--single-item"] if force else []), *(["--pull"] if pull else []), stage]
    get_run_logger().info("$ dvc %s  (in %s)", " ".join(args), project_dir)
    start = time.monotonic()
    lines = stream_command([*_dvc_command(), *args], project_dir, stage,
                           failure=f"stage {stage!r} failed: dvc {' '.join(args)}")
    seconds = round(time.monotonic() - start, 1)
    ran = any(f"Running stage '{stage}'" in line for line in lines)
    get_run_logger().info("stage %s %s in %.1f s", stage, "ran" if ran else "was up to date", seconds)
    return {"stage": stage, "ran": ran, "seconds": seconds}


@task(cache_policy=NO_CACHE)
def push_outputs(project_dir: str, stages: list[str]) -> None:
    """`dvc push --run-cache <stages>`: outputs and run-cache entries to the DVC remote, for other workers."""
    args = ["push", "--run-cache", *stages]
    get_run_logger().info("$ dvc %s  (in %s)", " ".join(args), project_dir)
    stream_command([*_dvc_command(), *args], project_dir, "push", failure=f"dvc {' '.join(args)}")


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def eval_rows(metrics: dict) -> list[dict]:
    """The table artifact's rows: the success rate and its interval first, other overall figures, then tasks."""
    overall = [k for k in HEADLINE if k in metrics] + [k for k in metrics if "/" not in k and k not in HEADLINE]
    per_task = [k for k in metrics if "/" in k]  # evaluate writes them grouped by task
    return [{"metric": k, "value": metrics[k]} for k in overall + per_task]


def describe_release(project: Path, report: dict) -> dict:
    """Where a release went: reports/publish.json holds only numbers (version, files, bytes); the repo id
    and target are the project's publish params, which the publish stage ran with."""
    from lingbot.config import load_run_config

    cfg = load_run_config(Path(project) / "params.yaml").publish
    tag = f"v{int(report['version'])}"
    if cfg.target == "hub":
        from huggingface_hub import constants

        url = f"{constants.ENDPOINT}/{cfg.repo_id}/tree/{tag}"
    else:
        url = (Path(project) / cfg.local_dir / cfg.repo_id).resolve().as_uri()
    return {"repo_id": cfg.repo_id, "tag": tag, "target": cfg.target, "url": url, **report}


def release_link(release: dict) -> str:
    return f"[{release['repo_id']}@{release['tag']}]({release['url']})"


@task(cache_policy=NO_CACHE)
def report_artifacts(project_dir: str, results: list[dict], failed: str | None = None) -> dict:
    """The evaluation table (when evaluate ran in this flow) and the markdown run report."""
    project = Path(project_dir)
    names = [r["stage"] for r in results]
    metrics = read_json(project / EVAL_METRICS) if "evaluate" in names else None
    report = read_json(project / PUBLISH_REPORT) if "publish" in names else None
    release = report and describe_release(project, report)
    if metrics:
        create_table_artifact(eval_rows(metrics), key="lingbot-eval",
                              description=f"Evaluation metrics ({EVAL_METRICS}) of this pipeline run")
    lines = ["# lingbot pipeline run", "", f"Project: `{project}`", ""]
    if failed:
        lines += [f"**Failed at stage `{failed}`**: the stages after it did not run.", ""]
    lines += ["| stage | result | seconds |", "|---|---|---|"]
    lines += [f"| `{r['stage']}` | {'ran' if r['ran'] else 'up to date (DVC cache)'} | {r['seconds']} |"
              for r in results]
    lines.append("")
    if metrics:
        shown = {k: metrics[k] for k in HEADLINE if k in metrics}
        lines += ["## Evaluation", "", ", ".join(f"{k} {v:g}" for k, v in shown.items()), ""]
    lines += ["## Release", ""]
    if release:
        lines.append(f"Release {release_link(release)} ({release['target']}; {release.get('files')} files, "
                     f"{release.get('bytes')} bytes).")
    elif "publish" in names:
        lines.append(f"No release: the publish stage wrote no `{PUBLISH_REPORT}`.")
    else:
        lines.append("No release: the publish stage was not part of this run.")
    markdown = "\n".join(lines) + "\n"
    create_markdown_artifact(markdown, key="lingbot-pipeline-report", description="lingbot pipeline run report")
    return {"metrics": metrics, "release": release, "report": markdown}


# --- the flow -------------------------------------------------------------------------------------------


def use_params(project: Path, params_file: str | None) -> None:
    """Make `params_file` the project's params.yaml (DVC and the stages read that file), checked first."""
    if not params_file:
        return
    source = (project / params_file) if not Path(params_file).is_absolute() else Path(params_file)
    target = project / "params.yaml"
    if target.exists() and source.resolve() == target.resolve():
        return
    from lingbot.config import load_run_config

    load_run_config(source)  # a typo fails here, before any stage runs
    shutil.copyfile(source, target)
    get_run_logger().info("params: %s copied to %s", source, target)


def run_stages(project_dir: str, stages: list[str], retries: dict[str, int] | None = None,
               retry_delay_seconds: float = 10.0, force: set[str] = frozenset(), pull: bool = False) -> list[dict]:
    """Run `stages` in order, one task each (those in `force` even if unchanged); on a failure the
    markdown report names the stage, then it raises."""
    retries = DEFAULT_RETRIES if retries is None else retries
    results = []
    for stage in stages:
        stage_task = repro_stage.with_options(name=stage, task_run_name=stage, retries=retries.get(stage, 0),
                                              retry_delay_seconds=retry_delay_seconds)
        try:
            results.append(stage_task(project_dir, stage, force=stage in force, pull=pull))
        except Exception:
            report_artifacts(project_dir, results, failed=stage)
            raise
    return results


@flow(name="lingbot-pipeline", log_prints=True)
def pipeline(project_dir: str = ".", target: str | None = None, stages: list[str] | None = None,
             params_file: str | None = None, retries: dict[str, int] | None = None,
             retry_delay_seconds: float = 10.0, pull: bool = False, push: bool = False) -> dict:
    """Run the DVC pipeline: every stage (default), `target` and everything upstream, or exactly `stages`.

    Args:
        project_dir: the lingbot project (holding dvc.yaml and params.yaml).
        target: last stage to run (with all its upstream stages), e.g. "evaluate".
        stages: these stages (in DAG order), e.g. ["finetune", "evaluate"]; `dvc repro` still brings a
            changed upstream stage up to date first, within the task of its first downstream stage.
        params_file: a params file to run with; it becomes the project's params.yaml.
        retries: retries per stage name (default: collect 2, ingest 2; others 0).
        retry_delay_seconds: wait between retries.
        pull: take the outputs dvc.lock records from the DVC remote instead of recomputing them (a fresh
            scale-out worker with the committed dvc.lock).
        push: send the stages' outputs (and run-cache entries) to the DVC remote afterwards.
    """
    project = Path(project_dir).resolve()
    order = stage_order(project, target=target, stages=stages)
    get_run_logger().info("stages, in DAG order: %s", " -> ".join(order))
    use_params(project, params_file)
    results = run_stages(str(project), order, retries, retry_delay_seconds, pull=pull)
    if push:
        push_outputs(str(project), order)
    artifacts = report_artifacts(str(project), results)
    return {"stages": results, "metrics": artifacts["metrics"], "release": artifacts["release"]}


if __name__ == "__main__":
    # One machine, no work pool: serve the deployment from this process (runs on demand from the UI/CLI).
    pipeline.serve(name="lingbot-pipeline", parameters={"project_dir": str(Path.cwd())})
