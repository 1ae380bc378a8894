"""The policy server: the real tiny policy on loopback, driven by an unmodified openpi-client.

openpi-client 0.1.2 pins numpy<2 (lingbot needs numpy>=2), so the client lives in its own venv, as on a
robot: built once per machine under pytest's cache dir, and client scripts run there as subprocesses,
printing one JSON line per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

OPENPI_CLIENT = "openpi-client==0.1.2"
# 0.1.2 imports typing_extensions without declaring it: a robot's venv needs it too.
CLIENT_REQUIREMENTS = (OPENPI_CLIENT, "typing-extensions>=4")

# Runs in the client venv. Reads a plan {"url", "observation": {"image_size", "state_dim"}, "steps"} on
# stdin; prints {"i", "op", "t", and "reply" | "error" | "closed"} per step.
CLIENT = r"""
import json, os, sys, time
import numpy as np
import websockets.exceptions
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy

plan = json.load(sys.stdin)
spec = plan["observation"]
host, port = plan["url"].rsplit(":", 1)

def jsonable(x):
    if isinstance(x, np.ndarray):
        return {"array": x.tolist(), "shape": list(x.shape), "dtype": x.dtype.str}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return {k.decode() if isinstance(k, bytes) else k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x

def observation(step, meta):
    rng = np.random.default_rng(step.get("seed", 0))
    h, w = spec["image_size"]
    obs = {cam: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for cam in meta["cameras"]}
    obs[meta["state_key"]] = rng.standard_normal(spec["state_dim"]).astype(np.float32)
    for key in ("task", "prompt"):
        if key in step:
            obs[key] = step[key]
    if "type" in step:
        obs["lingbot/type"] = step["type"]
    if "pad" in step:
        obs["lingbot/pad"] = np.zeros(step["pad"], np.uint8)
    corrupt = step.get("corrupt")
    if corrupt == "missing_camera":
        del obs[meta["cameras"][0]]
    elif corrupt == "float_image":
        obs[meta["cameras"][0]] = obs[meta["cameras"][0]].astype(np.float32)
    elif corrupt == "gray_image":
        obs[meta["cameras"][0]] = obs[meta["cameras"][0]][..., 0]
    elif corrupt == "matrix_state":
        obs[meta["state_key"]] = np.zeros((2, spec["state_dim"]), np.float32)
    return obs

def call(fn):
    try:
        return {"reply": jsonable(fn())}
    except RuntimeError as exc:  # openpi's client: the server answered with a text frame
        return {"error": str(exc)}
    except websockets.exceptions.ConnectionClosed as exc:
        return {"closed": exc.rcvd.code if exc.rcvd is not None else None}

def recv_raw(ws):
    reply = ws.recv()
    if isinstance(reply, str):
        raise RuntimeError(reply)
    return msgpack_numpy.unpackb(reply)

def connect():
    return WebsocketClientPolicy(host=host, port=int(port))

client = connect()
meta = client.get_server_metadata()
for i, step in enumerate(plan["steps"]):
    op = step["op"]
    if op == "metadata":
        out = {"reply": jsonable(client.get_server_metadata())}
    elif op == "infer":
        out = call(lambda: client.infer(observation(step, meta)))
    elif op == "message":
        out = call(lambda: client.infer(step["message"]))
    elif op == "raw":
        data = bytes.fromhex(step["hex"]) if "hex" in step else step["text"]
        out = call(lambda: (client._ws.send(data), recv_raw(client._ws))[1])
    elif op == "send_only":
        client._ws.send(msgpack_numpy.packb(observation(step, meta)))
        out = {}
    elif op == "wait_until":
        time.sleep(max(0.0, step["t"] - time.time()))
        out = {}
    elif op == "sleep":
        time.sleep(step["s"])
        out = {}
    elif op == "reconnect":
        client = connect()
        out = {"reply": jsonable(client.get_server_metadata())}
    elif op == "recv_close":
        out = call(lambda: recv_raw(client._ws))
    elif op == "poll_status":
        deadline = time.time() + step.get("timeout", 20)
        while True:
            out = call(lambda: client.infer({"lingbot/type": "status"}))
            status = out.get("reply", {})
            if all(status.get(k) == v for k, v in step["until"].items()) or time.time() > deadline:
                break
            time.sleep(0.05)
    elif op == "exit":
        os._exit(0)  # no close frame: the server sees the TCP connection drop
    else:
        raise SystemExit(f"unknown op {op}")
    print(json.dumps({"i": i, "op": op, "t": time.time(), **out}), flush=True)
"""


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def openpi_python(request) -> Path:
    """Python of a venv holding openpi-client from PyPI (numpy<2), built once and cached by version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    venv = request.config.cache.mkdir(f"client-venv-{OPENPI_CLIENT.replace('==', '-')}-py{version}")
    python, stamp = venv / "bin" / "python", venv / ".complete"
    if python.exists() and stamp.is_file() and stamp.read_text().split() == list(CLIENT_REQUIREMENTS):
        return python
    shutil.rmtree(venv)
    base = Path(sys.base_prefix) / "bin" / f"python{version}"
    subprocess.run([str(base), "-m", "venv", str(venv)], check=True, capture_output=True)
    pip = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                          *CLIENT_REQUIREMENTS], capture_output=True, text=True)
    if pip.returncode != 0:
        pytest.fail(f"cannot install {' '.join(CLIENT_REQUIREMENTS)} from PyPI into the client venv {venv}:\n"
                    f"{(pip.stdout + pip.stderr)[-2000:]}")
    stamp.write_text("\n".join(CLIENT_REQUIREMENTS) + "\n")
    return python


@pytest.fixture(scope="module")
def policy(tiny_bundle):
    from lingbot.policy.runtime import load_policy

    return load_policy(tiny_bundle)


@pytest.fixture(scope="module")
def observation_spec(tiny_bundle, tiny_config) -> dict:
    norm = json.loads((tiny_bundle / "normalization.json").read_text())
    size = tiny_config.collect.image_size
    return {"image_size": [size, size], "state_dim": len(norm["state"]["q01"])}


@contextlib.contextmanager
def running(server):
    """Run a PolicyServer on a free loopback port in a thread; yields its ws:// URL; stops it after."""
    box: dict = {}
    ready = threading.Event()

    async def main():
        box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()

        def on_ready(host, port):
            box["url"] = f"ws://{host}:{port}"
            ready.set()

        return await server.run("127.0.0.1", 0, box["stop"], on_ready=on_ready)

    def target():
        try:
            box["report"] = asyncio.run(main())
        except BaseException as exc:  # surfaced in the test thread
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    assert ready.wait(30) and "error" not in box, box.get("error")
    try:
        yield box["url"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(30)
        assert not thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def url(policy):
    from lingbot.policy.server import PolicyServer

    with running(PolicyServer(policy)) as address:
        yield address


def start_client(python, url, spec, steps) -> subprocess.Popen:
    proc = subprocess.Popen([str(python), "-c", CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps({"url": url, "observation": spec, "steps": steps}))
    proc.stdin.close()
    proc.stdin = None  # so communicate() does not flush it
    return proc


def finish_client(proc, timeout=120) -> list[dict]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"client failed:\n{err[-3000:]}"
    return [json.loads(line) for line in out.splitlines()]


def run_client(python, url, spec, steps, timeout=120) -> list[dict]:
    return finish_client(start_client(python, url, spec, steps), timeout)


def actions(result: dict) -> np.ndarray:
    assert "reply" in result, result
    reply = result["reply"]["actions"]
    assert reply["dtype"] == "<f4"
    return np.asarray(reply["array"], np.float32).reshape(reply["shape"])


# --- tests ----------------------------------------------------------------------------------------------


def test_metadata_infer_observe_reset(openpi_python, url, observation_spec, tiny_bundle):
    meta = json.loads((tiny_bundle / "policy.json").read_text())
    steps = [{"op": "metadata"}, {"op": "infer", "seed": 1}, {"op": "infer", "seed": 2, "type": "observe"},
             {"op": "infer", "seed": 3},
             {"op": "message", "message": {"lingbot/type": "reset", "task": meta["tasks"][-1]}},
             {"op": "infer", "seed": 1, "task": meta["tasks"][-1]},
             {"op": "message", "message": {"lingbot/type": "status"}}]
    res = run_client(openpi_python, url, observation_spec, steps)
    got = res[0]["reply"]
    assert got["lingbot/protocol"] == "lingbot-serve/1"
    for key in ("cameras", "action_dim", "actions_per_chunk", "fps", "tasks", "state_key"):
        assert got[key] == meta[key], key
    assert set(got["message_types"]) == {"infer", "observe", "reset", "status"}

    first, second = actions(res[1]), actions(res[3])
    assert first.shape == second.shape == (meta["actions_per_chunk"], meta["action_dim"])
    assert np.isfinite(first).all() and not np.array_equal(first, second)
    assert res[1]["reply"]["lingbot/chunk"] == 0 and res[3]["reply"]["lingbot/chunk"] == 1
    assert res[1]["reply"]["server_timing"]["infer_ms"] > 0
    assert "prev_total_ms" in res[3]["reply"]["server_timing"]
    assert res[2]["reply"]["lingbot/type"] == "ack" and res[2]["reply"]["observed"] == 1
    assert res[4]["reply"]["task"] == meta["tasks"][-1]
    assert res[5]["reply"]["lingbot/chunk"] == 0  # the reset started a new session
    status = res[6]["reply"]
    assert status["sessions"] == 1 and status["connections"] == 1, status  # this client's own


def test_concurrent_clients_have_isolated_sessions(openpi_python, url, observation_spec, policy):
    tasks = policy.meta["tasks"]
    mine = [{"op": "infer", "seed": 10}, {"op": "infer", "seed": 11, "type": "observe"},
            {"op": "infer", "seed": 12, "type": "observe"}, {"op": "infer", "seed": 13}, {"op": "infer", "seed": 14},
            {"op": "infer", "seed": 15}, {"op": "infer", "seed": 16}, {"op": "infer", "seed": 17}]
    other = [{"op": "infer", "seed": 100 + i, "task": tasks[-1], **({"type": "observe"} if i % 3 else {})}
             for i in range(16)]
    alone = [actions(r) for r in run_client(openpi_python, url, observation_spec, mine) if "actions" in r["reply"]]

    start = {"op": "wait_until", "t": time.time() + 4}  # both connected by then: their chunks interleave
    a = start_client(openpi_python, url, observation_spec, [start, *mine])
    b = start_client(openpi_python, url, observation_spec, [start, *other])
    res_a, res_b = finish_client(a), finish_client(b)
    together = [actions(r) for r in res_a[1:] if "actions" in r["reply"]]
    assert len(together) == len(alone) == 6
    for x, y in zip(alone, together):
        np.testing.assert_array_equal(x, y)
    other_actions = [actions(r) for r in res_b[1:] if "actions" in r["reply"]]
    assert not np.array_equal(other_actions[0], together[0])
    # The two clients were served at the same time, not one after the other.
    assert res_a[1]["t"] < res_b[-1]["t"] and res_b[1]["t"] < res_a[-1]["t"]


def test_malformed_messages_get_errors_and_the_connection_keeps_serving(openpi_python, url, observation_spec,
                                                                       policy):
    camera = policy.meta["cameras"][0]
    bad_array = {camera: {b"__ndarray__": True, b"data": b"abc", b"dtype": "|u1", b"shape": [32, 32, 3]}}
    steps = [
        {"op": "raw", "hex": b"\xc1 not msgpack".hex()},
        {"op": "raw", "text": "hello"},
        {"op": "raw", "hex": msgpack.packb([1, 2, 3]).hex()},
        {"op": "raw", "hex": msgpack.packb(bad_array).hex()},
        {"op": "raw", "hex": msgpack.packb({camera: {b"__ndarray__": True, b"data": b"", b"dtype": "|O",
                                                     b"shape": [0]}}).hex()},
        {"op": "message", "message": {"lingbot/type": "dance"}},
        {"op": "message", "message": {"lingbot/type": "reset", "task": 7}},
        {"op": "infer", "seed": 1, "corrupt": "missing_camera"},
        {"op": "infer", "seed": 1, "corrupt": "float_image"},
        {"op": "infer", "seed": 1, "corrupt": "gray_image"},
        {"op": "infer", "seed": 1, "corrupt": "matrix_state"},
        {"op": "infer", "seed": 1},
        {"op": "message", "message": {"lingbot/type": "status"}},
    ]
    res = run_client(openpi_python, url, observation_spec, steps)
    errors = [r.get("error", "") for r in res[:-2]]
    expected = ["not openpi msgpack", "text frame", "expected a map", "not openpi msgpack", "not openpi msgpack",
                "unknown lingbot/type 'dance'", "task must be", f"lacks '{camera}'", "uint8 array (H, W, 3)",
                "uint8 array (H, W, 3)", "finite float vector"]
    for err, want in zip(errors, expected, strict=True):
        assert "lingbot: error:" in err and want in err, (want, err)
    assert actions(res[-2]).shape == (policy.meta["actions_per_chunk"], policy.meta["action_dim"])
    assert res[-1]["reply"]["errors"] >= len(expected)


def test_oversized_messages(openpi_python, policy, observation_spec):
    from lingbot.policy.server import PolicyServer

    limit = 64 * 1024  # an observation here is ~6 KB
    steps = [{"op": "infer", "seed": 1, "pad": 2 * limit}, {"op": "infer", "seed": 1},
             {"op": "infer", "seed": 1, "pad": 5 * limit}, {"op": "reconnect"}, {"op": "infer", "seed": 1}]
    with running(PolicyServer(policy, max_message_bytes=limit)) as address:
        res = run_client(openpi_python, address, observation_spec, steps)
    assert f"exceeds the limit of {limit}" in res[0]["error"]
    assert actions(res[1]).shape[1] == policy.meta["action_dim"]  # same connection, still served
    assert res[2].get("closed") == 1009, res[2]  # beyond 4 x the limit: refused unread, "message too big"
    assert res[3]["reply"]["max_message_bytes"] == limit
    assert actions(res[4]).shape[1] == policy.meta["action_dim"]


class _SlowPolicy:
    """The real policy with a pause before each chunk, so a client can leave while one is in flight."""

    def __init__(self, policy, pause: float):
        self.policy, self.meta, self.pause = policy, policy.meta, pause
        self.started, self.closed = threading.Event(), threading.Event()

    def new_session(self, task):
        session, owner = self.policy.new_session(task), self

        class Slow:
            observe = session.observe

            def infer(self, observation):
                owner.started.set()
                time.sleep(owner.pause)
                return session.infer(observation)

            def close(self):
                session.close()
                owner.closed.set()

        return Slow()


def test_disconnect_mid_chunk_frees_the_session(openpi_python, policy, observation_spec):
    from lingbot.policy.server import PolicyServer

    slow = _SlowPolicy(policy, pause=1.5)
    leaver = [{"op": "send_only", "seed": 1}, *[{"op": "send_only", "seed": s} for s in (2, 3, 4)],
              {"op": "sleep", "s": 0.5}, {"op": "exit"}]
    watcher = [{"op": "poll_status", "until": {"sessions": 0, "connections": 1}},
               {"op": "infer", "seed": 5}, {"op": "message", "message": {"lingbot/type": "status"}}]
    with running(PolicyServer(slow)) as address:
        gone = start_client(openpi_python, address, observation_spec, leaver)
        finish_client(gone)
        assert slow.started.is_set()  # it left while its first chunk was computing
        res = run_client(openpi_python, address, observation_spec, watcher)
    assert slow.closed.is_set()
    status, final = res[0]["reply"], res[2]["reply"]
    assert status["sessions"] == 0 and status["sessions_closed"] == 1, status
    # The chunk in flight finished, its reply was dropped, and the 3 messages queued behind it never ran.
    assert status["chunks"] == 1 and status["replies_dropped"] == 1, status
    assert actions(res[1]).shape[1] == policy.meta["action_dim"]
    assert final["sessions"] == 1 and final["sessions_opened"] == 2


def test_serve_cli_sigterm_shuts_down_gracefully(openpi_python, tiny_bundle, observation_spec):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "lingbot.cli", "serve", "--policy", str(tiny_bundle),
                               "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(180, server.kill)  # a hung server fails the test instead of hanging it
    watchdog.start()
    try:
        ready = json.loads(server.stdout.readline() or "{}")
        assert ready.get("listening", "").startswith("ws://127.0.0.1:"), server.stderr.read()
        client = start_client(openpi_python, ready["listening"], observation_spec,
                              [{"op": "infer", "seed": 1}, {"op": "recv_close"}])
        first = json.loads(client.stdout.readline())  # one chunk served; the client now waits on the socket
        assert first["reply"]["actions"]["shape"][0] > 0
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, err
    report = json.loads(out.splitlines()[-1])
    assert report["sessions"] == 0 and report["sessions_opened"] == report["sessions_closed"] == 1
    assert report["connections"] == 0 and report["chunks"] == 1
    assert "shutting down: 1 connection(s) open" in err
    out, _ = client.communicate(timeout=30)
    assert json.loads(out.splitlines()[-1])["closed"] == 1001  # going away


def test_serve_cli_refuses_a_non_bundle(tmp_path, capsys):
    from lingbot.cli import main

    assert main(["serve", "--policy", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lingbot: error:") and "not a lingbot policy bundle" in err and "\n" not in err
