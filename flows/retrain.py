"""Prefect flow `lingbot-retrain`: the scheduled retraining loop.

1. Refresh the demonstrations: the data stages (collect, ingest) through `dvc repro`, ingest forced, so a
   Hub dataset at a moving revision (`org/name@main`) or a local directory outside DVC is re-resolved and
   fingerprinted. Unchanged data gives byte-identical ingest outputs: DVC then reruns nothing after it.
2. Compare the ingested demonstrations (`demos_fingerprint` of data/demos: the source's content
   fingerprint and revision in lingbot.json, the split and the stats) with the ones the current release
   was trained on (its policy.json provenance). Same data: stop; nothing is trained or published.
3. New data: run the chain up to evaluate (DVC reruns what the data reaches: latents, training, evaluate).
4. Compare the candidate's reports/eval.json with the current release on the same evaluation seeds: by
   default the release is pulled and evaluated again here (`lingbot evaluate`, this project's evaluation
   seeds and code), so both numbers come from the same episodes.
5. Publish (`dvc repro --force publish`: the next tag) only when the candidate is better; see `decide`.

The decision is the flow's result and a markdown artifact (`lingbot-retrain-decision`).

    python -m flows.retrain       # serve it on this machine, nightly (flow.serve with a cron schedule)
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.pipeline import (
    EVAL_METRICS,
    PUBLISH_REPORT,
    describe_release,
    read_json,
    release_link,
    run_stages,
    stage_order,
    stream_command,
    use_params,
)

DEMOS = "data/demos"
DATA_STAGE = "ingest"  # the stage whose output is "the demonstrations"
POLICY_META = "policy.json"


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the retraining loop decided, and why: the flow's result and its artifact."""

    action: str  # "publish", "keep" (a candidate was evaluated, not better) or "skip" (no new demonstrations)
    reason: str
    candidate: float | None = None  # the success rates compared
    current: float | None = None
    current_tag: str | None = None
    baseline: str | None = None  # where `current` comes from: "re-evaluated" or "recorded" (the release's eval.json)
    new_tag: str | None = None

    @property
    def publish(self) -> bool:
        return self.action == "publish"


def decide(candidate: dict, current: dict | None, min_success: float = 0.0, current_tag: str | None = None) -> Decision:
    """Publish the candidate only when its success rate is strictly higher than the current release's.

    Both evaluations must come from the same evaluation episodes (the flow sees to it). A tie keeps the
    current release: with tens of episodes an equal rate is no evidence of improvement, and a new tag
    would move every robot to another policy for nothing; neither latency nor the interval breaks a tie.
    Below `min_success` (the publish stage's gate) nothing is published, first release included.
    """
    rate = float(candidate["success_rate"])
    old = None if current is None else float(current["success_rate"])
    if rate < min_success:
        return Decision("keep", f"candidate success rate {rate:.3f} is below publish.min_success {min_success:.3f}",
                        candidate=rate, current=old, current_tag=current_tag)
    if old is None:
        return Decision("publish", f"first release: candidate success rate {rate:.3f}", candidate=rate)
    if rate > old:
        action, reason = "publish", f"candidate success rate {rate:.3f} > {old:.3f} of {current_tag}"
    elif rate == old:
        action, reason = "keep", f"tie: candidate success rate {rate:.3f} = {old:.3f} of {current_tag}, which stays"
    else:
        action, reason = "keep", f"candidate success rate {rate:.3f} < {old:.3f} of {current_tag}"
    return Decision(action, reason, candidate=rate, current=old, current_tag=current_tag)


def episodes_per_task(metrics: dict) -> dict:
    """{task: episodes} of an eval.json: which evaluation it is (the seeds are evaluate.seed + i per task)."""
    return {key.rpartition("/")[0]: value for key, value in metrics.items() if key.endswith("/episodes")}


# --- the current release (lingbot.hub) -----------------------------------------------------------------------


def publish_config(project: Path):
    """params.yaml's publish section, the local hub's root taken relative to the project (as the stage does)."""
    from lingbot.config import load_run_config

    cfg = load_run_config(project / "params.yaml").publish
    if cfg.target == "local" and not Path(cfg.local_dir).is_absolute():
        cfg = dataclasses.replace(cfg, local_dir=str(project / cfg.local_dir))
    return cfg


def release_policy_meta(cfg, release: dict) -> dict:
    """policy.json of a release (what it was trained on), checked against the release's manifest."""
    from lingbot.errors import LingbotError
    from lingbot.hub.manifest import MANIFEST, read_manifest, sha256_file

    if cfg.target == "local":
        from lingbot.hub.local import LocalHub

        folder = LocalHub(Path(cfg.local_dir), cfg.repo_id).snapshot(release["commit"])
        meta_path, manifest = folder / POLICY_META, read_manifest(folder)
    else:
        from huggingface_hub import hf_hub_download

        meta_path, manifest_path = (Path(hf_hub_download(cfg.repo_id, name, revision=release["commit"]))
                                    for name in (POLICY_META, MANIFEST))
        manifest = json.loads(manifest_path.read_text())
    if sha256_file(meta_path) != manifest["files"].get(POLICY_META, {}).get("sha256"):
        raise LingbotError(f"{POLICY_META}: does not match {MANIFEST} of {cfg.repo_id}@{release['tag']}")
    return json.loads(meta_path.read_text())


def data_changed(demos_fingerprint: str, release_meta: dict | None, tag: str | None) -> tuple[bool, str]:
    """Whether the ingested demonstrations differ from the ones the release was trained on, and why."""
    if release_meta is None:
        return True, "no release yet"
    trained_on = ((release_meta.get("provenance") or {}).get("cache") or {}).get("dataset")
    if trained_on is None:
        return True, f"release {tag} does not record its training data"
    if trained_on == demos_fingerprint:
        return False, f"no new demonstrations: {tag} was trained on these (demos fingerprint {trained_on[:12]})"
    return True, f"new demonstrations: demos fingerprint {trained_on[:12]} of {tag} -> {demos_fingerprint[:12]}"


@task(cache_policy=NO_CACHE)
def evaluate_release(project_dir: str, cfg, release: dict) -> dict:
    """The release pulled (verified) and evaluated on this project's evaluation seeds: its eval.json."""
    spec = f"{release['repo_id']}@{release['tag']}"
    lingbot = [sys.executable, "-m", "lingbot.cli"]
    local = ["--local-hub", cfg.local_dir] if cfg.target == "local" else []
    with tempfile.TemporaryDirectory(prefix="lingbot-release-") as tmp:
        policy, out = Path(tmp) / "policy", Path(tmp) / "eval"
        stream_command([*lingbot, "pull", spec, "--dir", str(policy), *local], project_dir, "pull",
                       failure=f"lingbot pull {spec}")
        stream_command([*lingbot, "evaluate", "--params", "params.yaml", "--policy", str(policy), "--out", str(out),
                        "--metrics", str(out / "eval.json"), "--quiet"], project_dir, "evaluate-release",
                       failure=f"evaluating {spec}")
        return json.loads((out / "eval.json").read_text())


@task(cache_policy=NO_CACHE)
def record_decision(decision: Decision, demos: dict | None, release: dict | None, metrics: dict | None,
                    published: dict | None) -> str:
    lines = ["# lingbot retraining decision", "", f"**{decision.action}**: {decision.reason}", ""]
    if demos:
        source = demos.get("source") or {}
        commit = f", commit `{source['commit']}`" if source.get("commit") else ""
        lines.append(f"- demonstrations: `{source.get('spec')}`{commit}, content fingerprint "
                     f"`{demos.get('fingerprint')}`, {demos.get('episodes')} episodes")
    lines.append(f"- current release: `{release['repo_id']}@{release['tag']}`" if release else "- current release: none")
    if decision.candidate is not None:
        current = "none" if decision.current is None else f"{decision.current:.3f} ({decision.baseline})"
        lines.append(f"- success rate: candidate {decision.candidate:.3f}, current release {current}")
    if metrics:
        lines.append(f"- candidate evaluation: {metrics.get('episodes')} episodes, 95% interval "
                     f"[{metrics.get('success_ci_low')}, {metrics.get('success_ci_high')}]")
    if published:
        lines.append(f"- published: {release_link(published)}")
    lines += ["", "Rule: publish only when the candidate's success rate is strictly higher than the current "
                  "release's on the same evaluation episodes; a tie keeps the current release."]
    markdown = "\n".join(lines) + "\n"
    create_markdown_artifact(markdown, key="lingbot-retrain-decision", description="lingbot retraining decision")
    return markdown


# --- the flow -------------------------------------------------------------------------------------------


@flow(name="lingbot-retrain", log_prints=True)
def retrain(project_dir: str = ".", params_file: str | None = None, candidate_stage: str = "evaluate",
            publish_stage: str = "publish", refresh_data: bool = True, reevaluate_release: bool = True,
            retries: dict[str, int] | None = None, retry_delay_seconds: float = 10.0) -> dict:
    """Retrain when the demonstrations changed; publish a new tag only when the candidate is better.

    Args:
        project_dir: the lingbot project (holding dvc.yaml and params.yaml).
        params_file: a params file to run with; it becomes the project's params.yaml.
        candidate_stage: the stage that writes the candidate's reports/eval.json (run with its upstream).
        publish_stage: the stage that publishes the candidate as the next tag.
        refresh_data: force the ingest stage, so the dataset source is re-resolved and fingerprinted.
        reevaluate_release: evaluate the current release again on this project's evaluation seeds (default).
            False reuses its recorded eval.json when it covers the same tasks and episodes (this assumes
            evaluate.seed did not change since), and re-evaluates otherwise.
        retries: retries per stage name (default: collect 2, ingest 2; others 0).
        retry_delay_seconds: wait between retries.
    """
    from lingbot.data.latents import demos_fingerprint
    from lingbot.hub.pull import latest_release

    logger = get_run_logger()
    project = Path(project_dir).resolve()
    use_params(project, params_file)
    publish_cfg = publish_config(project)

    data_stages = stage_order(project, target=DATA_STAGE)
    chain = [s for s in stage_order(project, target=candidate_stage) if s not in data_stages]
    if publish_stage in chain or publish_stage not in stage_order(project):
        raise ValueError(f"candidate_stage {candidate_stage!r} must lie upstream of a publish stage "
                         f"{publish_stage!r} of dvc.yaml: the candidate is published only after the comparison")
    run_stages(str(project), data_stages, retries, retry_delay_seconds, force={DATA_STAGE} if refresh_data else set())
    demos = read_json(project / DEMOS / "lingbot.json")
    release = latest_release(publish_cfg)
    release_meta = release and release_policy_meta(publish_cfg, release)
    changed, why = data_changed(demos_fingerprint(project / DEMOS), release_meta, release and release["tag"])
    logger.info(why)
    metrics = published = None
    if not changed:
        decision = Decision("skip", why, current_tag=release["tag"])
    else:
        run_stages(str(project), chain, retries, retry_delay_seconds)
        metrics = read_json(project / EVAL_METRICS)
        if metrics is None:
            raise FileNotFoundError(f"{project / EVAL_METRICS}: the chain up to {candidate_stage} wrote no evaluation")
        baseline, source = None, None
        if release is not None:
            if not reevaluate_release and episodes_per_task(release["eval"]) == episodes_per_task(metrics):
                baseline, source = release["eval"], "recorded"
            else:
                logger.info("evaluating %s@%s on this project's evaluation seeds", release["repo_id"], release["tag"])
                baseline, source = evaluate_release(str(project), publish_cfg, release), "re-evaluated"
        decision = decide(metrics, baseline, publish_cfg.min_success, release and release["tag"])
        decision = dataclasses.replace(decision, reason=f"{why}; {decision.reason}", baseline=source)
        if decision.publish:
            # forced: the decision is to publish this candidate, whatever DVC remembers of earlier publishes
            run_stages(str(project), [publish_stage], retries, retry_delay_seconds, force={publish_stage})
            report = read_json(project / PUBLISH_REPORT)
            published = report and describe_release(project, report)
            decision = dataclasses.replace(decision, new_tag=published and published["tag"])
    logger.info("decision: %s (%s)", decision.action, decision.reason)
    markdown = record_decision(decision, demos, release, metrics, published)
    return dataclasses.asdict(decision) | {"report": markdown}


if __name__ == "__main__":
    # One machine, no work pool: serve the nightly schedule from this process.
    retrain.serve(name="retrain-nightly", cron="0 2 * * *", parameters={"project_dir": str(Path.cwd())})
