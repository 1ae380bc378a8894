"""The local hub: a directory laid out like a Hub model repo, the embedded default publish target.

One repository per repo id, under the local hub's root (`publish.local_dir`)::

    <local_dir>/<org>/<name>/
        commits/<commit>/       one complete snapshot per release: exactly the files the Hub repo holds
                                at that commit (README.md, manifest.json, eval.json, the bundle files)
        refs/tags/v1            text: the commit id tag v1 points to (written once, never moved)
        refs/tags/v2
        refs/main               text: the commit id of the newest release (the Hub's main branch)
        .lock                   flock'd while a publish runs, so two publishers cannot take one tag

A commit id is 40 hex digits, like a git commit: the sha1 of the release's manifest.json, which names
every file's sha256 and the tag, so it identifies the whole snapshot.

Atomicity: a snapshot is built in ``commits/.tmp-*`` and renamed to ``commits/<commit>`` in one step;
only then is ``refs/tags/vN`` created (a hard link of a finished temporary file: it appears whole or not
at all, and an existing tag is never overwritten), then ``refs/main`` is replaced by a rename. A commit
is only reachable through a ref, so a failure at any point leaves the previous release as it was and no
tag for the new one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lingbot.errors import LingbotError
from lingbot.fsutil import atomic_file
from lingbot.hub.manifest import MANIFEST, TAG_RE, latest_tag


def commit_id(manifest_bytes: bytes) -> str:
    return hashlib.sha1(b"lingbot-release\0" + manifest_bytes).hexdigest()


class LocalHub:
    """One repository of the local hub."""

    def __init__(self, root: Path, repo_id: str):
        self.repo_id = repo_id
        self.path = Path(root) / repo_id

    @property
    def exists(self) -> bool:
        return (self.path / "refs").is_dir()

    def tags(self) -> dict[str, str]:
        tag_dir = self.path / "refs" / "tags"
        if not tag_dir.is_dir():
            return {}
        return {p.name: p.read_text().strip() for p in sorted(tag_dir.iterdir())
                if p.is_file() and TAG_RE.match(p.name)}

    def resolve(self, revision: str) -> str:
        """Commit id of a tag, of "main", or a commit id itself."""
        if revision == "main":
            ref = self.path / "refs" / "main"
        else:
            ref = self.path / "refs" / "tags" / revision
        if ref.is_file():
            return ref.read_text().strip()
        if len(revision) == 40 and (self.path / "commits" / revision).is_dir():
            return revision
        if not self.exists:
            raise LingbotError(f"{self.repo_id}: no such repository in the local hub {self.path.parent.parent}")
        known = ", ".join(self.tags()) or "none"
        raise LingbotError(f"{self.repo_id}@{revision}: no such tag in the local hub (tags: {known})")

    def snapshot(self, commit: str) -> Path:
        path = self.path / "commits" / commit
        if not path.is_dir():
            raise LingbotError(f"{self.repo_id}: commit {commit} is missing from the local hub")
        return path

    def latest(self) -> tuple[str, str] | None:
        tags = self.tags()
        tag = latest_tag(tags)
        return (tag, tags[tag]) if tag else None

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def new_snapshot(self) -> Iterator[Path]:
        """Yield an empty directory on the hub's filesystem to build a release in; removed afterwards
        unless `commit` moved it into place."""
        commits = self.path / "commits"
        commits.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=commits))
        try:
            yield tmp
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, snapshot: Path, tag: str) -> str:
        """Make a finished snapshot (holding manifest.json) a commit, tag it and move main onto it."""
        if (self.path / "refs" / "tags" / tag).exists():
            raise LingbotError(f"{self.repo_id}: tag {tag} already exists in the local hub")
        oid = commit_id((Path(snapshot) / MANIFEST).read_bytes())
        target = self.path / "commits" / oid
        created = False
        if not target.exists():  # else: the same snapshot is already committed
            os.replace(snapshot, target)
            created = True
        try:
            self._create_tag(tag, oid)
        except BaseException:
            if created:  # an untagged commit would be unreachable: take it back
                shutil.rmtree(target, ignore_errors=True)
            raise
        with atomic_file(self.path / "refs" / "main") as tmp:
            tmp.write_text(oid + "\n")
        return oid

    def _create_tag(self, tag: str, oid: str) -> None:
        ref = self.path / "refs" / "tags" / tag
        ref.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{tag}.", dir=ref.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(oid + "\n")
            os.link(tmp, ref)  # a finished file appears under the tag's name, or fails if the tag exists
        except FileExistsError:
            raise LingbotError(f"{self.repo_id}: tag {tag} already exists in the local hub") from None
        finally:
            os.unlink(tmp)
