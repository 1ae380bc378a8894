"""The policy server behind `lingbot serve`: openpi's websocket protocol, one policy session per connection.

An unmodified `openpi-client` (`WebsocketClientPolicy`) connects, reads the metadata and calls `infer`.
Every message is one websocket frame; binary frames carry msgpack with numpy arrays encoded as openpi
does: an array is a map `{b"__ndarray__": True, b"data": raw bytes, b"dtype": "<f4", b"shape": [..]}`,
a numpy scalar `{b"__npgeneric__": True, b"data": value, b"dtype": ..}`.

Server -> client, once on connect: the metadata map::

    {"lingbot/protocol": "lingbot-serve/1", "cameras": [...], "state_key": "observation.state",
     "action_dim": A, "actions_per_chunk": K, "fps": .., "tasks": [...], "max_message_bytes": N,
     "message_types": ["infer", "observe", "reset", "status"],
     "robot": {"type", "action_names", "state_names"} (bundles assembled with the dataset's description)}

Client -> server: a map; its `"lingbot/type"` picks the message (absent: `infer`, so openpi clients work
unchanged). Observations are LeRobot-style: every camera key of the metadata -> uint8 (H, W, 3), the
state key -> float (S,), and optionally `"task"` (or openpi's `"prompt"`; default: the first task).

    infer    observation            -> {"actions": float32 (K, A) in robot units, "lingbot/chunk": i,
                                        "server_timing": {"infer_ms", "prev_total_ms"}}
    observe  observation            -> {"lingbot/type": "ack", "observed": frames streamed so far}
             streams one real frame into the session's KV cache between chunks
    reset    {"task"?}              -> {"lingbot/type": "ack", "task": task}: a new session (new episode)
    status   {}                     -> {"lingbot/type": "status", "sessions", "connections", ...}: counters

Every reply of the server also carries `"server_timing"`. An observation whose task differs from the
session's starts a new session, as a reset would (openpi's client `reset()` never reaches the server).

Errors are text frames, `"lingbot: error: ..."` (openpi's client raises `RuntimeError` on a text frame),
and the connection keeps serving: a message that is not msgpack, has missing keys or wrong shapes, or is
larger than `max_message_bytes`. Only a message beyond 4 x `max_message_bytes` is refused by the
websocket layer itself (close code 1009, never buffered). A failure inside the policy also drops the
session (its cache may be half-written); the next message starts a fresh one.

Each connection owns one session (its own KV cache and streaming-VAE state) over weights shared by all;
inference runs in worker threads, so one client's chunk never blocks another's messages. A client that
leaves mid-chunk has its session closed once the chunk in flight ends; messages it queued are dropped.
SIGTERM (or SIGINT): stop accepting, close every connection (1001 going away), let chunks in flight
finish, close their sessions, exit 0. `GET /healthz` answers 200 for load balancers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lingbot.errors import LingbotError

PROTOCOL = "lingbot-serve/1"
MESSAGE_TYPES = ("infer", "observe", "reset", "status")
DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20
HARD_LIMIT_FACTOR = 4  # beyond this multiple of max_message_bytes the websocket layer drops the connection
TYPE_KEY = "lingbot/type"

log = logging.getLogger("lingbot.serve")


# --- openpi's msgpack + numpy encoding ------------------------------------------------------------------


def _encode_numpy(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "OVc":
            raise TypeError(f"cannot send an array of dtype {obj.dtype}")
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot pack {type(obj).__name__}")


def _decode_numpy(obj: dict) -> Any:
    import numpy as np

    if b"__ndarray__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind in "OVc":
            raise ValueError(f"arrays of dtype {dtype} are not accepted")
        return np.ndarray(buffer=obj[b"data"], dtype=dtype, shape=tuple(obj[b"shape"]))
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def packb(obj: Any) -> bytes:
    """msgpack bytes of `obj`, numpy arrays and scalars encoded as openpi's client expects."""
    import msgpack

    return msgpack.packb(obj, default=_encode_numpy, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """The inverse of `packb` (and of openpi's `msgpack_numpy.packb`); raises LingbotError on bad input."""
    import msgpack

    try:
        return msgpack.unpackb(data, object_hook=_decode_numpy, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises a zoo of types (ExtraData, FormatError, ValueError, ...)
        raise LingbotError(f"message is not openpi msgpack ({type(exc).__name__}: {exc})") from None


# --- the server -------------------------------------------------------------------------------------------


class _Connection:
    """What one client owns: its session (created at reset or on the first observation) and counters."""

    def __init__(self) -> None:
        self.session = None
        self.task: str | None = None
        self.chunks = 0
        self.observed = 0


class PolicyServer:
    """Serves `policy` (lingbot.policy.runtime's Policy: `new_session(task)` -> session with `observe`,
    `infer`, `close`) to any number of websocket clients. `meta` (default `policy.meta`) is the bundle's
    policy.json."""

    def __init__(self, policy, meta: dict | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        meta = policy.meta if meta is None else meta
        if max_message_bytes < 1:
            raise LingbotError(f"max message bytes must be positive, got {max_message_bytes}")
        if not meta.get("tasks"):
            raise LingbotError("the policy lists no tasks; cannot pick a default task")
        self.policy = policy
        self.meta = meta
        self.max_message_bytes = int(max_message_bytes)
        self.cameras = list(meta["cameras"])
        self.state_key = meta.get("state_key", "observation.state")
        self.counters = dict(connections=0, sessions=0, sessions_opened=0, sessions_closed=0, chunks=0,
                             observed=0, errors=0, replies_dropped=0)
        self.address: tuple[str, int] | None = None

    def metadata(self) -> dict:
        meta = self.meta
        out = {
            "lingbot/protocol": PROTOCOL,
            "cameras": self.cameras,
            "state_key": self.state_key,
            "action_dim": int(meta["action_dim"]),
            "actions_per_chunk": int(meta["actions_per_chunk"]),
            "fps": meta["fps"],
            "tasks": list(meta["tasks"]),
            "max_message_bytes": self.max_message_bytes,
            "message_types": list(MESSAGE_TYPES),
        }
        for key in ("image_size", "state_dim", "robot"):  # robot: type, action/state channel names in order
            if key in meta:
                out[key] = meta[key]
        return out

    def status(self) -> dict:
        return dict(self.counters)

    async def run(self, host: str, port: int, stop: asyncio.Event,
                  on_ready: Callable[[str, int], None] | None = None) -> dict:
        """Serve until `stop` is set, then shut down gracefully. Returns the final counters."""
        from websockets.asyncio.server import serve

        try:
            server = await serve(self._handle, host, port, compression=None,
                                 max_size=HARD_LIMIT_FACTOR * self.max_message_bytes,
                                 process_request=_health_check)
        except OSError as exc:
            raise LingbotError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
        async with server:
            self.address = server.sockets[0].getsockname()[:2]
            if on_ready is not None:
                on_ready(*self.address)
            await stop.wait()
            log.info("shutting down: %d connection(s) open", self.counters["connections"])
            server.close()  # stop accepting, close connections with 1001; handlers end their chunks
            await server.wait_closed()
        return self.status()

    async def _handle(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed
        from websockets.protocol import State

        conn = _Connection()
        self.counters["connections"] += 1
        peer = ws.remote_address
        log.info("connection from %s", peer)
        prev_total_ms = None
        try:
            await ws.send(packb(self.metadata()))
            async for message in ws:
                if ws.state is not State.OPEN:  # the client left: drop what it queued
                    break
                start = time.monotonic()
                try:
                    reply = await self._reply(conn, message)
                except LingbotError as exc:
                    self.counters["errors"] += 1
                    log.info("%s: error: %s", peer, exc)
                    reply = f"lingbot: error: {exc}"
                else:
                    reply["server_timing"] = {"infer_ms": (time.monotonic() - start) * 1000}
                    if prev_total_ms is not None:
                        reply["server_timing"]["prev_total_ms"] = prev_total_ms
                    reply = packb(reply)
                try:
                    await ws.send(reply)
                except ConnectionClosed:
                    self.counters["replies_dropped"] += 1
                    raise
                prev_total_ms = (time.monotonic() - start) * 1000
        except ConnectionClosed:
            pass
        finally:
            await self._close_session(conn)
            self.counters["connections"] -= 1
            log.info("connection from %s closed (%d chunks)", peer, conn.chunks)

    async def _reply(self, conn: _Connection, message) -> dict:
        if isinstance(message, str):
            raise LingbotError("expected a binary msgpack message, got a text frame")
        if len(message) > self.max_message_bytes:
            raise LingbotError(f"message of {len(message)} bytes exceeds the limit of {self.max_message_bytes}")
        request = unpackb(message)
        if not isinstance(request, dict):
            raise LingbotError(f"expected a map, got {type(request).__name__}")
        kind = request.get(TYPE_KEY, "infer")
        if kind == "status":
            return {TYPE_KEY: "status", **self.status()}
        if kind == "reset":
            task = self._task(request, default=self.meta["tasks"][0])
            await self._close_session(conn)
            await self._open_session(conn, task)
            return {TYPE_KEY: "ack", "task": task}
        if kind not in ("infer", "observe"):
            raise LingbotError(f"unknown {TYPE_KEY} {kind!r} (known: {', '.join(MESSAGE_TYPES)})")
        observation = self._observation(request, default_task=conn.task or self.meta["tasks"][0])
        if conn.session is None or observation["task"] != conn.task:
            await self._close_session(conn)
            await self._open_session(conn, observation["task"])
        if kind == "observe":
            await self._in_session(conn, conn.session.observe, observation)
            conn.observed += 1
            self.counters["observed"] += 1
            return {TYPE_KEY: "ack", "observed": conn.observed}
        actions = await self._in_session(conn, conn.session.infer, observation)
        actions = self._check_actions(actions)
        conn.chunks += 1
        self.counters["chunks"] += 1
        return {"actions": actions, "lingbot/chunk": conn.chunks - 1}

    async def _in_session(self, conn: _Connection, fn, observation):
        """Run a session call in a worker thread; an unexpected failure drops the (maybe broken) session."""
        try:
            return await asyncio.to_thread(fn, observation)
        except LingbotError:
            raise
        except Exception as exc:
            log.exception("policy failed")
            await self._close_session(conn)
            raise LingbotError(f"policy failed ({type(exc).__name__}: {exc}); the session was reset") from None

    async def _open_session(self, conn: _Connection, task: str) -> None:
        conn.session = await asyncio.to_thread(self.policy.new_session, task)
        conn.task, conn.chunks, conn.observed = task, 0, 0
        self.counters["sessions"] += 1
        self.counters["sessions_opened"] += 1

    async def _close_session(self, conn: _Connection) -> None:
        session, conn.session, conn.task = conn.session, None, None
        if session is None:
            return
        self.counters["sessions"] -= 1
        self.counters["sessions_closed"] += 1
        try:
            await asyncio.to_thread(session.close)
        except Exception:
            log.exception("closing a session failed")

    @staticmethod
    def _task(request: dict, default: str) -> str:
        task = request.get("task", request.get("prompt", default))
        if not isinstance(task, str) or not task:
            raise LingbotError(f"task must be a non-empty string, got {task!r}")
        return task

    def _observation(self, request: dict, default_task: str) -> dict:
        """The LeRobot-style observation of a request, checked, as fresh writable arrays."""
        import numpy as np

        missing = [key for key in (*self.cameras, self.state_key) if key not in request]
        if missing:
            raise LingbotError(f"observation lacks {', '.join(map(repr, missing))} "
                               f"(expected {', '.join(self.cameras)} and {self.state_key})")
        out = {"task": self._task(request, default_task)}
        size = self.meta.get("image_size")
        for key in self.cameras:
            image = request[key]
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise LingbotError(f"{key} must be a uint8 array (H, W, 3), got {_describe(image)}")
            if size is not None and image.shape[:2] != tuple(_pair(size)):
                raise LingbotError(f"{key} must be {_pair(size)[0]}x{_pair(size)[1]}, got {_describe(image)}")
            out[key] = np.array(image)
        state = request[self.state_key]
        try:
            state = np.array(state, dtype=np.float32)
        except (TypeError, ValueError):
            raise LingbotError(f"{self.state_key} must be a float vector, got {_describe(request[self.state_key])}") \
                from None
        if state.ndim != 1 or not np.isfinite(state).all():
            raise LingbotError(f"{self.state_key} must be a finite float vector (S,), got {_describe(state)}")
        if "state_dim" in self.meta and state.shape[0] != int(self.meta["state_dim"]):
            raise LingbotError(f"{self.state_key} must have {self.meta['state_dim']} values, got {state.shape[0]}")
        out[self.state_key] = state
        return out

    def _check_actions(self, actions):
        import numpy as np

        actions = np.ascontiguousarray(np.asarray(actions, dtype=np.float32))
        if actions.ndim != 2 or actions.shape[1] != int(self.meta["action_dim"]):
            raise LingbotError(f"policy returned actions of shape {actions.shape}, "
                               f"expected (K, {self.meta['action_dim']})")
        return actions


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


def _describe(value) -> str:
    import numpy as np

    if isinstance(value, np.ndarray):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__


def _health_check(connection, request):
    import http

    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None


def serve(bundle: Path, host: str = "127.0.0.1", port: int = 8000, *, device: str = "cpu", dtype: str = "auto",
          max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
          on_ready: Callable[[str, int], None] | None = None) -> dict:
    """Load the bundle on `device` with the world model in `dtype` (auto: bf16 on a GPU that has it,
    fp32 on CPUs) and serve it until SIGTERM or SIGINT; returns the final counters."""
    import signal

    from lingbot.policy.runtime import load_policy

    policy = load_policy(Path(bundle), device=device, dtype=dtype)
    server = PolicyServer(policy, max_message_bytes=max_message_bytes)

    async def main() -> dict:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await server.run(host, port, stop, on_ready=on_ready)

    return asyncio.run(main())
