"""Atomic outputs: every stage writes to a temporary sibling and renames it into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `target`, on failure it is removed.

    The temporary directory is a sibling of `target` (same filesystem), so the final step is a rename:
    readers see either the old complete output or the new complete output, never a half-written one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    shutil.rmtree(tmp)  # callers (LeRobot among them) want to create the directory themselves
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path, missing: str) -> Any:
    """Parsed JSON of `path`; a missing file or bad JSON is one LingbotError naming the file."""
    from lingbot.errors import LingbotError

    path = Path(path)
    if not path.is_file():
        raise LingbotError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LingbotError(f"{path}: not valid JSON ({exc})") from None


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def is_timing(key: str) -> bool:
    """Whether a result field measures time (seconds, rates, latencies): it differs on every run, so it
    is kept beside the results, never in a hashed output. `offline/latency_ms_mean`: the last part counts."""
    key = key.rpartition("/")[2]
    return key == "seconds" or key.startswith("latency_ms") or key.endswith(("_seconds", "_s", "_per_s_per_core", "_hz"))


def timings_path(metrics: Path) -> Path:
    """Where a stage's timings go beside its DVC metrics file: `reports/eval.json` ->
    `reports/eval.timings.json` (in git, not in dvc.lock: they differ on every run)."""
    return Path(metrics).with_name(f"{Path(metrics).stem}.timings.json")


def link_or_copy(src: str, dst: str) -> str:
    """shutil.copytree's copy_function: a hard link where the filesystem allows it (no second copy of
    a large dataset on disk; the source files are never written to), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst
