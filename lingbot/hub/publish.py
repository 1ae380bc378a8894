"""Publish a policy bundle as a tagged release: gate, assemble, commit, tag.

The release is built once, in a temporary directory: the bundle's files, ``eval.json``, LeRobot's
``config.json`` and processor files (with the LeRobot plugin installed: ``lerobot-eval --policy.path``
loads a release), the model card ``README.md`` and ``manifest.json`` (lingbot/hub/manifest.py). It then goes to one of two targets:

- ``local`` (the embedded default): the local hub, laid out like the Hub repo (lingbot/hub/local.py).
- ``hub``: the Hugging Face Hub through ``HfApi``: ``create_repo(exist_ok=True)``, one ``create_commit``
  holding the whole release (and deleting files of the previous release that are gone), then
  ``create_tag`` on exactly that commit. ``create_commit`` rather than ``upload_folder``: with hf_xet
  installed, ``upload_folder`` pipelines large folders into several commits, and a release must be one
  commit. ``parent_commit`` is the head read before, so a concurrent push fails instead of interleaving.

The token comes from ``HF_TOKEN`` or the HF login and is left to huggingface_hub: it never passes
through this module's variables, messages, metrics or files.

Each release is tagged ``v<N+1>`` where ``vN`` is the highest existing tag. The tag is created after the
commit succeeded; a failure before leaves the previous release and its tags as they were.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from lingbot.config import PublishConfig
from lingbot.errors import LingbotError
from lingbot.hub.manifest import (
    CARD,
    EVAL,
    HUB_OWN_FILES,
    MANIFEST,
    build_manifest,
    check_safe,
    list_files,
    manifest_bytes,
    next_tag,
)

logger = logging.getLogger("lingbot.publish")
TARGETS = ("local", "hub")
GATED = ("success_rate", "offline/action_error")  # the gate's figure, by preference


def read_metrics(path: Path) -> dict:
    from lingbot.fsutil import read_json, timings_path

    metrics = read_json(Path(path), "evaluation metrics not found; run stage evaluate first")
    if not isinstance(metrics, dict) or not any(isinstance(metrics.get(k), (int, float)) for k in GATED):
        raise LingbotError(f"{path}: neither a numeric success_rate nor an offline/action_error; "
                           "not an evaluation report")
    timings = timings_path(Path(path))  # latency and control rate, for the model card
    if timings.is_file():
        metrics = {**read_json(timings, "evaluation timings unreadable"), **metrics}
    return metrics


def gate_metric(metrics: dict) -> tuple[str, float]:
    """What the gate reads: the simulator's success rate when one ran, else the open-loop action error."""
    key = next(k for k in GATED if isinstance(metrics.get(k), (int, float)))
    return key, float(metrics[key])


def check_gate(metrics: dict, cfg: PublishConfig, where: Path) -> None:
    key, value = gate_metric(metrics)
    if key == "success_rate" and value < cfg.min_success:
        raise LingbotError(
            f"{where}: success_rate {value:.3f} is below publish.min_success {cfg.min_success:.3f}; not publishing"
        )
    if key == "offline/action_error" and value > cfg.max_action_error:
        raise LingbotError(f"{where}: offline/action_error {value:.4f} is above publish.max_action_error "
                           f"{cfg.max_action_error:.4f}; not publishing")


def _check_config(cfg: PublishConfig) -> None:
    if cfg.target not in TARGETS:
        raise LingbotError(f"params: publish.target must be one of {', '.join(TARGETS)}, got {cfg.target!r}")
    if cfg.repo_id.count("/") != 1 or not all(cfg.repo_id.split("/")):
        raise LingbotError(f"params: publish.repo_id must look like org/name, got {cfg.repo_id!r}")


def _read_optional(path: Path | None, kind: str):
    if path is None or not Path(path).is_file():
        return None
    text = Path(path).read_text()
    if kind == "text":
        return text
    if kind == "yaml":
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def assemble(out: Path, bundle: Path, eval_path: Path, repo_id: str, tag: str, bundle_meta: dict,
             metrics: dict, demos: dict | None, lock: dict | None, params_text: str | None) -> dict:
    """Write the release into the empty directory `out`; return its manifest."""
    from lingbot.hub.card import build_card

    out = Path(out)
    for rel in list_files(bundle):
        check_safe(rel)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(bundle) / rel, out / rel)
    shutil.copyfile(eval_path, out / EVAL)
    try:  # LeRobot's config.json and processors: `lerobot-eval --policy.path=<release>` then just works
        from lerobot_policy_lingbot.export import write_lerobot_files
    except ImportError:
        logger.warning("publish: the LeRobot plugin (lerobot_policy_lingbot) is not installed; the release "
                       "will not load with --policy.path")
    else:
        write_lerobot_files(out)
    files = {rel: {"size": (out / rel).stat().st_size} for rel in list_files(out)}
    (out / CARD).write_text(build_card(repo_id, tag, bundle_meta, metrics, demos, lock, params_text, files))
    manifest = build_manifest(out, repo_id, tag)
    (out / MANIFEST).write_bytes(manifest_bytes(manifest))
    return manifest


def publish(bundle: Path, eval_path: Path, cfg: PublishConfig, *, params: Path | None = None,
            lock: Path | None = None, demos: Path | None = None) -> dict:
    """Release `bundle` with its evaluation to `cfg.target`. Returns what was released."""
    from lingbot.policy.bundle import read_bundle

    _check_config(cfg)
    bundle, eval_path = Path(bundle), Path(eval_path)
    metrics = read_metrics(eval_path)
    check_gate(metrics, cfg, eval_path)
    meta = read_bundle(bundle)
    meta.pop("model_config", None)
    inputs = dict(bundle=bundle, eval_path=eval_path, bundle_meta=meta, metrics=metrics,
                  demos=_read_optional(demos, "json"), lock=_read_optional(lock, "yaml"),
                  params_text=_read_optional(params, "text"))
    if cfg.target == "local":
        report = _publish_local(cfg, inputs)
    else:
        report = _publish_hub(cfg, inputs)
    key, value = gate_metric(metrics)
    return {"repo_id": cfg.repo_id, "target": cfg.target, **report, key: value}


def _summary(tag: str, commit: str, manifest: dict, where: str) -> dict:
    files = manifest["files"]
    return {"tag": tag, "version": int(tag[1:]), "commit": commit, "files": len(files) + 1,
            "bytes": sum(f["size"] for f in files.values()) + len(manifest_bytes(manifest)), "url": where}


def _publish_local(cfg: PublishConfig, inputs: dict) -> dict:
    from lingbot.hub.local import LocalHub

    hub = LocalHub(Path(cfg.local_dir), cfg.repo_id)
    with hub.locked():
        tag = next_tag(hub.tags())
        with hub.new_snapshot() as tmp:
            manifest = assemble(tmp, repo_id=cfg.repo_id, tag=tag, **inputs)
            commit = hub.commit(tmp, tag)
    return _summary(tag, commit, manifest, str(hub.path))


def hub_error(exc: Exception, what: str) -> LingbotError:
    """One line from a Hub or network failure: the HTTP status and the server's message, never headers."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    message = getattr(exc, "server_message", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    message = " ".join(str(message).split())
    return LingbotError(f"{what}: " + (f"HTTP {status}: {message}" if status else message))


def _publish_hub(cfg: PublishConfig, inputs: dict) -> dict:
    import tempfile

    import httpx
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token

    unreachable = (httpx.HTTPError, ConnectionError)  # HfHubHTTPError, network failures, offline mode

    if not get_token():
        raise LingbotError("publish.target is hub but no Hugging Face token is set: "
                           "export HF_TOKEN or run `hf auth login`")
    api = HfApi()
    repo_id = cfg.repo_id
    try:
        api.create_repo(repo_id, private=cfg.private, exist_ok=True)
        refs = api.list_repo_refs(repo_id)
        head = next((b.target_commit for b in refs.branches if b.name == "main"), None)
        existing = set(api.list_repo_files(repo_id, revision=head)) if head else set()
    except unreachable as exc:
        raise hub_error(exc, f"{repo_id}: cannot read the Hub repository") from None
    tag = next_tag(t.name for t in refs.tags)
    with tempfile.TemporaryDirectory(prefix="lingbot-release-") as tmp:
        manifest = assemble(Path(tmp), repo_id=repo_id, tag=tag, **inputs)
        release = list_files(Path(tmp))
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(Path(tmp) / rel)) for rel in release]
        operations += [CommitOperationDelete(path_in_repo=rel)
                       for rel in sorted(existing - set(release) - HUB_OWN_FILES)]
        try:
            info = api.create_commit(repo_id, operations=operations, commit_message=f"Release {tag}",
                                     commit_description=f"lingbot release {tag}: {len(release)} files, "
                                     "%s %s" % gate_metric(inputs['metrics']),
                                     parent_commit=head)
        except unreachable as exc:
            raise hub_error(exc, f"{repo_id}: the Hub refused the release commit; no tag was created") from None
    try:
        api.create_tag(repo_id, tag=tag, revision=info.oid, tag_message=f"lingbot release {tag}")
    except unreachable as exc:
        raise hub_error(exc, f"{repo_id}: committed {info.oid} but could not tag it {tag} "
                             "(publish again to tag it)") from None
    return _summary(tag, info.oid, manifest, f"{api.endpoint}/{repo_id}/tree/{tag}")
