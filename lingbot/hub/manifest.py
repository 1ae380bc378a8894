"""The release format: which files a release holds, their sha256 manifest, and its verification.

A release is a policy bundle (lingbot/policy/bundle.py) plus ``eval.json``, ``README.md`` (the model
card) and ``manifest.json``::

    {"format": "lingbot-release/1", "repo_id": "org/name", "tag": "v3",
     "files": {"README.md": {"sha256": "...", "size": 1234}, "vae/config.json": {...}, ...}}

``files`` lists every file of the release except manifest.json itself, by POSIX path. Publishing and
pulling both go through this module, so a release is checked the same way wherever it comes from.
Only JSON, safetensors and the card are allowed: loading a release never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from lingbot.errors import LingbotError

FORMAT = "lingbot-release/1"
MANIFEST = "manifest.json"
EVAL = "eval.json"
CARD = "README.md"
# Files the Hub adds to every repo by itself (not part of a release, never copied by pull).
HUB_OWN_FILES = frozenset({".gitattributes"})
SAFE_SUFFIXES = frozenset({".json", ".safetensors", ".md"})
TAG_RE = re.compile(r"^v([1-9][0-9]*)$")
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(root: Path) -> list[str]:
    """Every regular file under `root` (symlinks followed, as in the HF cache), as sorted POSIX paths."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def check_safe(rel: str) -> None:
    """Refuse paths that leave the release and formats that would need unpickling."""
    parts = rel.split("/")
    if rel.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise LingbotError(f"{rel}: not a plain relative path; refusing it")
    if Path(rel).suffix not in SAFE_SUFFIXES:
        raise LingbotError(f"{rel}: only safetensors and JSON are released and loaded; refusing this file")


def build_manifest(root: Path, repo_id: str, tag: str) -> dict:
    """The manifest of every file under `root` (manifest.json excluded)."""
    files = {}
    for rel in list_files(root):
        if rel == MANIFEST:
            continue
        check_safe(rel)
        path = Path(root) / rel
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return {"format": FORMAT, "repo_id": repo_id, "tag": tag, "files": files}


def manifest_bytes(manifest: dict) -> bytes:
    """The one serialisation of a manifest (its bytes name a local-hub commit)."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise LingbotError(f"{MANIFEST}: missing from the release at {root}; cannot verify it")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LingbotError(f"{MANIFEST}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
            manifest.get("files"), dict):
        raise LingbotError(f"{MANIFEST}: not a {FORMAT} manifest")
    return manifest


def verify_release(root: Path) -> dict:
    """Check every file under `root` against its manifest.json; return the manifest.

    A missing file, a file the manifest does not list, a size or sha256 mismatch: one LingbotError
    naming the file.
    """
    root = Path(root)
    manifest = read_manifest(root)
    expected = manifest["files"]
    present = set(list_files(root)) - {MANIFEST}
    for rel in sorted(expected):
        check_safe(rel)
        if rel not in present:
            raise LingbotError(f"{rel}: listed in {MANIFEST} but missing from the release")
    for rel in sorted(present - set(expected)):
        raise LingbotError(f"{rel}: not listed in {MANIFEST}; refusing an unverified file")
    for rel in sorted(expected):
        path, want = root / rel, expected[rel]
        size = path.stat().st_size
        if size != want.get("size"):
            raise LingbotError(f"{rel}: {size} bytes, {MANIFEST} says {want.get('size')}; refusing the release")
        got = sha256_file(path)
        if got != want.get("sha256"):
            raise LingbotError(f"{rel}: sha256 {got[:12]}... does not match {MANIFEST} "
                               f"({str(want.get('sha256'))[:12]}...); refusing the release")
    return manifest


def tag_number(tag: str) -> int | None:
    match = TAG_RE.match(tag)
    return int(match.group(1)) if match else None


def latest_tag(tags) -> str | None:
    """The release tag vN with the highest N among `tags` (other tags are ignored)."""
    numbered = [(tag_number(t), t) for t in tags if tag_number(t) is not None]
    return max(numbered)[1] if numbered else None


def next_tag(tags) -> str:
    latest = latest_tag(tags)
    return f"v{(tag_number(latest) if latest else 0) + 1}"


def parse_spec(spec: str) -> tuple[str, str]:
    """`org/name@v3` -> ("org/name", "v3"); no `@` means the newest release ("main")."""
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise LingbotError(f"{spec!r}: expected a repo id like org/name, optionally @TAG")
    return repo_id, revision or "main"
