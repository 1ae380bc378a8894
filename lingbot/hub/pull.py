"""Pull a release onto a robot, verified; and read what the current release is.

``pull("org/name@v3", DIR)`` fetches the snapshot at the tag, from the Hub with ``snapshot_download``
(through the HF cache, so ``HF_HUB_OFFLINE=1`` works once the tag is cached) or from a local hub
(lingbot/hub/local.py), copies it into a temporary sibling of DIR, verifies every file against the
release's manifest.json (lingbot/hub/manifest.py), checks that the result is a policy bundle, and only
then renames it onto DIR. A mismatch, a missing or an extra file ends with one line naming the file, and
DIR is left as it was. Only JSON is parsed here; safetensors are hashed, never loaded, never unpickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lingbot.config import PublishConfig
from lingbot.errors import LingbotError
from lingbot.fsutil import atomic_dir
from lingbot.hub.manifest import (
    EVAL,
    HUB_OWN_FILES,
    MANIFEST,
    latest_tag,
    list_files,
    parse_spec,
    read_manifest,
    sha256_file,
    tag_number,
    verify_release,
)
from lingbot.hub.publish import hub_error


def _hub_snapshot(repo_id: str, revision: str, cache_dir: Path | None) -> Path:
    import httpx
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir))
    except RevisionNotFoundError:
        raise LingbotError(f"{repo_id}@{revision}: no such tag on the Hub") from None
    except RepositoryNotFoundError:
        raise LingbotError(f"{repo_id}: no such model repository on the Hub (or it is private: "
                           "export HF_TOKEN or run `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise LingbotError(f"{repo_id}@{revision}: the Hub cannot be reached and the tag is not in the HF cache "
                           "(pull it once online; HF_HUB_OFFLINE=1 then works from the cache)") from None
    except (httpx.HTTPError, ConnectionError) as exc:
        raise hub_error(exc, f"{repo_id}@{revision}: download failed") from None


def pull(spec: str, out: Path, *, local_hub: Path | None = None, cache_dir: Path | None = None) -> dict:
    """Fetch release `spec` (``org/name@TAG``; no tag: the newest) into `out`, verified."""
    from lingbot.hub.local import LocalHub
    from lingbot.policy.bundle import read_bundle

    repo_id, revision = parse_spec(spec)
    if local_hub is not None:
        hub = LocalHub(Path(local_hub), repo_id)
        commit = hub.resolve(revision)
        source = hub.snapshot(commit)
    else:
        source = _hub_snapshot(repo_id, revision, cache_dir)
        commit = source.name  # the HF cache names a snapshot by its commit
    with atomic_dir(Path(out)) as tmp:
        tmp.mkdir()
        for rel in list_files(source):
            if rel in HUB_OWN_FILES:
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, tmp / rel)  # follows the HF cache's symlinks to the blobs
        manifest = verify_release(tmp)  # the bytes that land in `out`, not the source, are checked
        if manifest.get("repo_id") != repo_id or (tag_number(revision) and manifest.get("tag") != revision):
            raise LingbotError(f"{MANIFEST}: release of {manifest.get('repo_id')}@{manifest.get('tag')}, "
                               f"not of {repo_id}@{revision}; refusing it")
        read_bundle(tmp)
    files = manifest["files"]
    size = sum(f["size"] for f in files.values()) + (Path(out) / MANIFEST).stat().st_size
    return {"repo_id": repo_id, "tag": manifest["tag"], "commit": commit, "dir": str(out),
            "files": len(files) + 1, "bytes": size}


def latest_release(cfg: PublishConfig, *, cache_dir: Path | None = None) -> dict | None:
    """The newest release of `cfg.repo_id` on `cfg.target`: tag, version, commit and its eval metrics.

    None when the repository or any release tag is missing. eval.json is checked against the release's
    manifest, so a comparison with a candidate never reads tampered numbers.
    """
    if cfg.target == "local":
        from lingbot.hub.local import LocalHub

        hub = LocalHub(Path(cfg.local_dir), cfg.repo_id)
        latest = hub.latest()
        if latest is None:
            return None
        tag, commit = latest
        folder = hub.snapshot(commit)
        manifest_path, eval_path = folder / MANIFEST, folder / EVAL
    else:
        import httpx
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import RepositoryNotFoundError

        api = HfApi()
        try:
            refs = api.list_repo_refs(cfg.repo_id)
            tag = latest_tag(t.name for t in refs.tags)
            if tag is None:
                return None
            commit = next(t.target_commit for t in refs.tags if t.name == tag)
            manifest_path, eval_path = (
                Path(hf_hub_download(cfg.repo_id, name, revision=commit, cache_dir=cache_dir))
                for name in (MANIFEST, EVAL)
            )
        except RepositoryNotFoundError:
            return None
        except (httpx.HTTPError, ConnectionError) as exc:
            raise hub_error(exc, f"{cfg.repo_id}: cannot read the current release") from None
    manifest = read_manifest(manifest_path.parent)
    want = manifest["files"].get(EVAL, {}).get("sha256")
    if want is None or sha256_file(eval_path) != want:
        raise LingbotError(f"{EVAL}: does not match {MANIFEST} of {cfg.repo_id}@{tag}; refusing its metrics")
    return {"repo_id": cfg.repo_id, "tag": tag, "version": int(tag[1:]), "commit": commit,
            "eval": json.loads(eval_path.read_text())}
