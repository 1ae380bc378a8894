"""The real-time policy: real observations stream into a KV cache, the next chunk is imagined, actions decoded.

Per chunk k (chunk 0 is the first observation alone; chunk k >= 1 holds the K actions that lead from
latent frame k-1 to latent frame k and the video latent they produce):

  1. ground: the real frames of the chunk just executed are encoded by the streaming VAE; the imagined
     entries of that chunk are dropped from the cache and the real latent plus the executed actions are
     written as permanent (clean) history;
  2. imagine: the video latent of chunk k is denoised from noise against the cache for
     `video_exec_step` of `video_steps` Euler steps (noise-latent acceleration: stopped part way) and
     written into the cache as history at its remaining noise level (the model was trained with such
     noisy history);
  3. act: the action chunk is denoised against the cache (inverse dynamics from the imagined video),
     mapped to the robot's action vector and returned.

Asynchronous mode pipelines this: the chunk returned at a boundary was computed while the previous
chunk executed (from the imagined video of that chunk); grounding the real frames and imagining the
next chunk then run in the background, so the robot never waits when a chunk computes faster than it
executes. Both modes draw the noise of chunk k from a generator seeded by (seed, k): a session is
deterministic, whatever else runs in the process. A ring window (`history_chunks`) bounds memory.

Frames: `observe(obs)` streams the frames between chunk boundaries; `infer(obs)` takes the boundary
frame (the last of the executed chunk) and the robot state there, which the next chunk's actions start
from (asynchronous mode computes chunk k+1 before its start state exists: it uses the state at the
start of chunk k, the latest there is; so for a model with keypoints, the latest real latent frame).
A chunk needs 4 * frame_stride frames; fewer (a client that only calls `infer`) are padded with the
earliest frame received, more keep the latest.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import deque
from typing import TYPE_CHECKING

import numpy as np
import torch

from lingbot.errors import LingbotError
from lingbot.model.world_model import FlowSampler, KVCache
from lingbot.policy.denoise import chunk_noise, denoise_chunk, recompute_sequence, write_history
from lingbot.policy.observation import observation_pixels, observation_state

if TYPE_CHECKING:
    from lingbot.policy.runtime import Policy


class Session:
    """One episode stream with its own KV cache and streaming VAE state. Not shared between threads."""

    def __init__(self, policy: Policy, task: str, seed: int):
        from lingbot.vae.wan import StreamingEncoder

        self.policy, self.seed = policy, seed
        self.encoder = StreamingEncoder(policy.vae)
        self._executor = concurrent.futures.ThreadPoolExecutor(1) if policy.cfg.asynchronous else None
        self.reset(task)

    # -- public API -------------------------------------------------------------------------------

    def reset(self, task: str | None = None) -> None:
        self._wait()
        p = self.policy
        if task is not None:
            self.task = task
        with torch.no_grad(), p.autocast():
            self.text = p.model.encode_text(p.task_embedding(self.task))
        self.cache = KVCache(p.model.cfg.depth)
        self.encoder.reset()
        self.chunk = 0  # chunks grounded so far (real latents in the cache)
        self.frames: list[dict] = []
        self.queue: deque = deque()
        self.pending = None  # async: the future of the next chunk
        self.imagined_at = None  # cache length before the newest imagined entries
        self.executing = None  # model-space actions of the chunk being executed (K, A)
        self.executing_state = None  # the state that chunk started from (1, S_model), or None
        self.latency_ms: list[float] = []  # per chunk: time the caller waited
        # On the policy's device (copied off it only by whoever reads them: videos, scores).
        self.real_latents: list[torch.Tensor] = []  # (cams, z, h, w) per grounded chunk
        self.executed: list[np.ndarray] = []  # (K, A_model) per grounded chunk
        self.start_states: list[torch.Tensor | None] = []  # (1, S_model) per chunk: its actions' start
        self.imagined_latents: list[torch.Tensor] = []  # (cams, z, h, w) per chunk handed to the robot

    def observe(self, observation: dict) -> None:
        """Stream one real frame taken between chunk boundaries."""
        self.frames.append(self._images(observation))

    def infer(self, observation: dict) -> np.ndarray:
        """The boundary frame in, the next action chunk out: (K, action_dim) float32 in robot units."""
        start = time.perf_counter()
        actions = self.compute_chunk(observation).float().cpu().numpy()  # the chunk's one wait for the device
        self.latency_ms.append((time.perf_counter() - start) * 1000)
        self.executing = actions
        return self.policy.layout.to_robot(actions)

    def compute_chunk(self, observation: dict) -> torch.Tensor:
        """`infer` up to its result: the next action chunk (K, A_model), normalised to -1..1, on the
        policy's device, not yet waited for. Call `infer` to drive a robot (it also records the chunk
        as executing)."""
        self.frames.append(self._images(observation))
        state = self._state(observation)
        latent = self._encode_chunk_frames()
        if self._executor is None:
            with self.policy.autocast():
                actions, imagined = self._ground_and_predict(latent, state)
            self.imagined_latents.append(imagined[0])
        else:
            actions = self._async_step(latent, state)
        self.executing_state = state
        return actions

    def correct_executed(self, actions: np.ndarray) -> None:
        """The robot executed `actions` (K, action_dim), robot units, instead of the chunk `infer` returned
        (a safety filter clipped it, a teleoperator took over, a recorded episode is replayed): the next
        `infer` grounds these as the chunk's history. Synchronous sessions only."""
        if self._executor is not None:
            raise LingbotError("correct_executed: an asynchronous session has already imagined ahead from the "
                               "returned chunk (set asynchronous: false)")
        if self.executing is None:
            raise LingbotError("correct_executed: no chunk is executing (call infer first)")
        actions = np.asarray(actions, np.float32)
        if actions.shape != (self.K, self.policy.layout.robot_dim):
            raise LingbotError(f"correct_executed: expected actions of shape {(self.K, self.policy.layout.robot_dim)}, "
                               f"got {actions.shape}")
        self.executing = self.policy.layout.to_model(actions)

    def select_action(self, observation: dict) -> np.ndarray:
        """LeRobot's per-step contract: one action (action_dim,); a new chunk every K steps."""
        if not self.queue:
            self.queue.extend(self.infer(observation))
        else:
            self.observe(observation)
        return self.queue.popleft()

    def imagined_video(self, camera: int = 0, chunks: int | None = None) -> np.ndarray:
        """The video this session imagined, decoded: uint8 frames (1 + 4(T - 1), H, W, 3) of camera
        `camera` (an index into the policy's cameras) over chunks 0..T-1 (every chunk so far when
        `chunks` is None). Chunk 0 is the first real observation (nothing is imagined before it); chunk
        k >= 1 is the video imagined for the k-th action chunk handed to the robot, which the real
        frames of grounded chunk k show."""
        self._wait()
        return self._decode([self.real_latents[0], *self.imagined_latents][:chunks], camera)

    def reconstructed_video(self, camera: int = 0, chunks: int | None = None) -> np.ndarray:
        """The real frames of the grounded chunks as the model saw them (their latents decoded: the
        VAE's reconstruction, the ceiling of `imagined_video`), in `imagined_video`'s layout."""
        self._wait()
        return self._decode(self.real_latents[:chunks], camera)

    def close(self) -> None:
        self._wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self.cache = KVCache(0)

    # -- internals --------------------------------------------------------------------------------

    def _images(self, observation: dict) -> torch.Tensor:
        """(cameras, 3, H, W) in [-1, 1] from the observation's camera keys."""
        return observation_pixels(observation, self.policy.cameras)

    def _state(self, observation: dict) -> torch.Tensor | None:
        """(1, S_model) normalised robot state of the observation, or None for a model without state input."""
        layout = self.policy.state_layout
        if layout is None:
            return None
        state = observation_state(observation, self.policy.state_key, layout.robot_dim)
        return torch.from_numpy(layout.to_model(state)).to(self.policy.device)

    def _encode_chunk_frames(self) -> torch.Tensor:
        """The real latent (1, cams, z, h, w) of the chunk that just ended, from the buffered frames."""
        if self.chunk == 0:
            frames = self.frames[-1:]
        else:
            need = 4 * self.policy.frame_stride
            frames = self.frames[-need:]
            frames = [frames[0]] * (need - len(frames)) + frames
            frames = frames[self.policy.frame_stride - 1 :: self.policy.frame_stride]
        self.frames = []
        latent = None
        for frame in frames:
            latent = self.encoder.push(frame.to(self.policy.device))
        assert latent is not None, "the VAE stream is out of step with the chunks"
        return latent[None]  # (1, cams, z, h, w)

    def _decode(self, latents: list[torch.Tensor], camera: int) -> np.ndarray:
        """Latents (cams, z, h, w) per chunk -> one camera's uint8 frames (1 + 4(T - 1), H, W, 3)."""
        from lingbot.vae.wan import decode_latents

        video = torch.stack(latents)[:, camera]  # (T, z, h, w)
        return decode_latents(self.policy.vae, video.permute(1, 0, 2, 3)[None].to(self.policy.device))[0]

    def _generator(self, chunk: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + chunk)

    @torch.no_grad()
    def _ground(self, latent: torch.Tensor, executed: np.ndarray | None, state: torch.Tensor | None) -> None:
        """Replace the imagined entries of the current chunk by its real latent and executed actions
        (which started from `state`; chunk 0 has none: padding, and the first observation's state)."""
        p, model = self.policy, self.policy.model
        if self.imagined_at is not None:
            self.cache.truncate(self.imagined_at)
        k = self.chunk
        if executed is None:  # chunk 0: no actions led to the first frame (padding, as in the cache)
            executed = p.layout.to_model(np.zeros((self.K, p.layout.robot_dim), np.float32))
        action = torch.from_numpy(np.ascontiguousarray(executed))[None].to(p.device)
        if model.cfg.attention == "causal":  # a bidirectional model recomputes its window instead
            write_history(model, self.cache, k, self.text, latent, action, p.cfg.history_chunks, state=state)
        if p.cfg.history_chunks:  # chunks no later query may attend to (see attention_mask's window):
            # the next query is chunk k + 1 (k + 2 in async mode, after chunk k + 1 is grounded again)
            self.cache.evict_before(2 * (k + 2 - p.cfg.history_chunks))
        self.real_latents.append(latent[0])
        self.executed.append(np.asarray(executed, np.float32))
        if k == 0:
            self.start_states.append(state)
        self.imagined_at = None
        self.chunk = k + 1

    @property
    def K(self) -> int:
        return self.policy.K

    def _predict(self, chunk: int, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Imagine the video of `chunk` (written into the cache) and decode its actions (K, A_model),
        starting from robot state `state`."""
        p = self.policy
        x, a, r = chunk_noise(self._generator(chunk), self.real_latents[-1].shape, self.K,
                              p.model.cfg.action_channels, p.device)
        self.imagined_at = len(self.cache)
        del self.start_states[chunk:]
        self.start_states.append(state)
        if p.model.cfg.attention != "causal":  # no KV cache: the window of the last history_chunks, again
            return recompute_chunk(self, chunk, last=p.cfg.history_chunks)
        actions, imagined = denoise_chunk(p.model, self.cache, chunk, self.text, x, a, p.cfg, state,
                                          p.layout.robot_dim, r, observed=self.real_latents[-1][None])
        return p.layout.clip(actions), imagined

    def _ground_and_predict(self, latent: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        self._ground(latent, self.executing, self.executing_state if self.chunk else state)
        return self._predict(self.chunk, state)

    # -- asynchronous pipelining ------------------------------------------------------------------

    def _async_step(self, latent: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        if self.pending is None:  # first boundary: nothing precomputed yet, compute chunk 1 now
            with self.policy.autocast():
                actions, imagined = self._ground_and_predict(latent, state)
            self.cache.truncate(self.imagined_at)  # rewritten with its actions by _speculate
            job = (None, None, None, actions, imagined, state)
        else:
            actions, imagined = self.pending.result()
            job = (latent, self.executing, self.executing_state, actions, imagined, state)
        # The background thread keeps the caller's grad/inference mode: a cache made under
        # torch.inference_mode (as LeRobot's loops run) can only be updated under it.
        self.pending = self._executor.submit(self._in_mode, torch.is_inference_mode_enabled(), *job)
        return actions

    def _in_mode(self, inference: bool, *job):
        with torch.inference_mode(inference), self.policy.autocast():
            return self._speculate(*job)

    @torch.no_grad()
    def _speculate(self, latent, executed, executed_state, actions: torch.Tensor, imagined: torch.Tensor, state):
        """Background: ground the chunk whose frames arrived, keep the one executing (started from
        `state`, the state observed at this boundary), imagine the next (from the same state: its own
        start state is not observed yet)."""
        p = self.policy
        if latent is not None:
            self._ground(latent, executed, executed_state)
        # The chunk being executed: its imagined video and its actions become provisional history
        # (not evicted against: grounding this chunk later still attends to the window before it).
        k, provisional = self.chunk, len(self.cache)
        action = actions[None]
        level = FlowSampler(p.cfg.video_steps, p.cfg.shift).level(p.cfg.video_exec_step)
        write_history(p.model, self.cache, k, self.text, imagined, action, p.cfg.history_chunks, level, state)
        self.start_states[k:] = [state]
        self.imagined_latents.append(imagined[0])
        next_actions, next_imagined = self._predict(k + 1, state)
        self.imagined_at = provisional  # grounding chunk k drops its provisional entries and all after
        return next_actions, next_imagined

    def _wait(self) -> None:
        if getattr(self, "pending", None) is not None:
            self.pending.result()
            self.pending = None


def recompute_chunk(session: Session, chunk: int, last: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`recompute_sequence` for chunk `chunk` of a session: its grounded history and seeded noise;
    `last` > 0: only the last `last` chunks of history (a window starting there, as in training)."""
    p = session.policy
    first = max(0, chunk - last) if last else 0
    real = torch.stack(session.real_latents[first:chunk])[None].to(p.device)  # (1, n, cams, z, h, w)
    executed = torch.from_numpy(np.stack(session.executed[first:chunk]))[None].to(p.device)  # (1, n, K, A)
    x, a, r = chunk_noise(session._generator(chunk), real.shape[2:], p.K, p.model.cfg.action_channels, p.device)
    states = None
    if p.state_layout is not None:
        states = torch.stack([s[0] for s in session.start_states[first : chunk + 1]])[None]  # (1, n + 1, S)
    actions, imagined = recompute_sequence(p.model, real, executed, p.task_embedding(session.task), x, a, p.cfg,
                                           states, p.layout.robot_dim, r)
    return p.layout.clip(actions), imagined
