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
start of chunk k, the latest there is). A chunk needs 4 * frame_stride frames; fewer (a client that
only calls `infer`) are padded with the earliest frame received, more keep the latest.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from lingbot.data.normalization import ChannelLayout
from lingbot.errors import LingbotError
from lingbot.model.world_model import FlowSampler, KVCache, WorldModel
from lingbot.policy.bundle import read_bundle
from lingbot.config import PolicyConfig, override


def chunk_noise(generator: torch.Generator, latent_shape, K: int, action_channels: int, device):
    """The noise of one chunk, in this order: the video's start (1, cams, z, h, w), the actions' start
    (1, K, A), and the noise the imagined latent is re-noised with (`PolicyConfig.imagined_noise`)."""
    x = torch.randn((1, *latent_shape), generator=generator).to(device)
    a = torch.randn((1, K, action_channels), generator=generator).to(device)
    r = torch.randn((1, *latent_shape), generator=generator).to(device)
    return x, a, r


def imagined_history(x: torch.Tensor, level: float, cfg: PolicyConfig, renoise: torch.Tensor | None):
    """The imagined latent x (at flow time `level`) as the actions will read it: re-noised to
    `cfg.imagined_noise` when that is higher (x must then be fully denoised). Returns (latent, level
    as a (1,) tensor on x's device)."""
    if cfg.imagined_noise <= level:
        return x, torch.full((1,), level, device=x.device)
    if level > 0 or renoise is None:
        raise ValueError("imagined_noise re-noises a fully denoised latent: needs video_exec_step == video_steps "
                         "and the chunk's re-noise draw")
    t = cfg.imagined_noise
    return (1 - t) * x + t * renoise, torch.full((1,), t, device=x.device)


@torch.no_grad()
def write_history(model: WorldModel, cache: KVCache, chunk: int, text: torch.Tensor, latent: torch.Tensor,
                  actions: torch.Tensor, history_chunks: int, level: float = 0.0, state=None) -> None:
    """The latent (1, cams, z, h, w) and actions (1, K, A) of `chunk` (started from state (1, S))
    become history in the cache.

    level 0: real frames and executed actions (step 1); above 0: an imagined latent at that noise level
    with the actions being executed (async mode's provisional history).
    """
    t_video = torch.full((1,), float(level), device=latent.device)
    model.step(cache, chunk, text, video=latent, t_video=t_video, action=actions,
               t_action=torch.zeros(1, device=latent.device), clean=True, window_chunks=history_chunks, state=state)


@torch.no_grad()
def denoise_chunk(model: WorldModel, cache: KVCache, chunk: int, text: torch.Tensor, x: torch.Tensor,
                  a: torch.Tensor, cfg: PolicyConfig, state=None, action_dim: int | None = None,
                  renoise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2 and 3 of the module docstring against `cache`: the imagined video stays in the cache.
    state (1, S): the robot state the chunk's actions start from (models with a state input);
    action_dim: the robot's action channels (the rest are padding, held at 0 as in training);
    renoise: chunk_noise's third draw (used when `cfg.imagined_noise` > 0).

    Returns the action chunk (K, A_model) in -1..1 and the imagined latent (1, cams, z, h, w), both on
    the model's device: nothing here waits for the device (the caller reads the actions once).
    """
    window = cfg.history_chunks
    if model.cfg.video_prediction:
        video = FlowSampler(cfg.video_steps, cfg.shift, device=x.device)
        for i in range(cfg.video_exec_step):
            v, _ = model.step(cache, chunk, text, video=x, t_video=video.t(i), window_chunks=window)
            x = video.step(x, v, i)
        history, level = imagined_history(x, video.level(cfg.video_exec_step), cfg, renoise)
        model.step(cache, chunk, text, video=history, t_video=level, clean=True, window_chunks=window)
    else:  # the no-video ablation imagines nothing: the actions read the real history and the state
        x = torch.zeros_like(x)
    act = FlowSampler(cfg.action_steps, cfg.shift, live=action_dim, device=x.device)
    a = act.start(a)
    for i in range(cfg.action_steps):
        _, v = model.step(cache, chunk, text, action=a, t_action=act.t(i), window_chunks=window, state=state)
        a = act.step(a, v, i)
    return a[0], x


def observation_pixels(observation: dict, cameras: list[str]) -> torch.Tensor:
    """(cameras, 3, H, W) in [-1, 1] from an observation's uint8 camera images; a missing or malformed
    one is one error."""
    from lingbot.vae.wan import to_pixels

    images = []
    for key in cameras:
        if key not in observation:
            raise LingbotError(f"observation has no {key!r} (keys: {', '.join(sorted(observation))})")
        image = np.asarray(observation[key])
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise LingbotError(f"observation {key!r}: expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
        images.append(image)
    return to_pixels(np.stack(images)[:, None])[:, :, 0]


def observation_state(observation: dict, key: str, dim: int) -> np.ndarray:
    """(1, dim) float32 robot state of an observation; missing, short or non-finite is one error."""
    if key not in observation:
        raise LingbotError(f"observation has no {key!r} (keys: {', '.join(sorted(observation))})")
    try:
        state = np.asarray(observation[key], np.float32).reshape(1, -1)
    except (TypeError, ValueError):
        raise LingbotError(f"observation {key!r}: expected a float vector ({dim},)") from None
    if state.shape[1] != dim or not np.isfinite(state).all():
        raise LingbotError(f"observation {key!r}: expected {dim} finite values, got {state.shape[1]}")
    return state


def policy_dtype(dtype: str, device: torch.device | str) -> str:
    """The world model's weights dtype for a policy on `device` ("auto", "fp32" or "bf16"), resolved as
    training's precision is: "auto" is bf16 on a CUDA GPU with native bf16 (what the GPU benchmark
    measures and `lingbot serve` serves there) and fp32 on every CPU (the small models' chunks are no
    faster in bf16 there)."""
    from lingbot.hardware import resolve_precision

    return resolve_precision(dtype, device, "policy", cpu_bf16=False)


def warn_untrained(model_cfg, cfg: PolicyConfig) -> None:
    """Warn where this policy config would show the model a history it was not trained on: a ring of
    another length than its training windows' (`window_chunks`), or imagined video left noisier than
    noisy-history augmentation ever made it (video denoising stopped early)."""
    import warnings

    from lingbot.model.world_model import HISTORY_NOISE_MAX

    if model_cfg.window_chunks and cfg.history_chunks != model_cfg.window_chunks:
        warnings.warn(f"policy: history_chunks {cfg.history_chunks}, but the model was trained with a "
                      f"{model_cfg.window_chunks}-chunk attention window: set policy.history_chunks "
                      f"{model_cfg.window_chunks}", stacklevel=3)
    level = FlowSampler(cfg.video_steps, cfg.shift).level(cfg.video_exec_step)
    if model_cfg.video_prediction and level > HISTORY_NOISE_MAX:
        warnings.warn(f"policy: video stopped at step {cfg.video_exec_step} of {cfg.video_steps} (shift {cfg.shift}) "
                      f"leaves the imagined history at noise level {level:.2f}; training re-noised history to at "
                      f"most {HISTORY_NOISE_MAX} (unless finetune.chunk_noise_p was set)", stacklevel=3)


class Policy:
    """A loaded bundle: the world model, the VAE, normalisation and task embeddings. Sessions share it.

    `dtype` ("fp32", "bf16", "auto": `policy_dtype`): the world model's weights; in bf16 every step
    also runs under bf16 autocast (the inputs, the sampler's state and the VAE stay fp32)."""

    def __init__(self, path: Path, device: str = "cpu", overrides: dict | None = None, dtype: str = "fp32"):
        from safetensors.torch import load_file

        from lingbot.hardware import torch_dtype
        from lingbot.vae.wan import load_vae

        self.path = Path(path)
        self.meta = read_bundle(self.path)
        self.cfg = override(PolicyConfig(), {**self.meta["policy"], **(overrides or {})})
        if not 1 <= self.cfg.video_exec_step <= self.cfg.video_steps:
            raise LingbotError(f"policy: video_exec_step must be in 1..video_steps ({self.cfg.video_steps})")
        model_cfg = self.meta["model_config"]
        if self.cfg.asynchronous and (model_cfg.attention != "causal" or not model_cfg.video_prediction):
            raise LingbotError("policy: asynchronous mode needs a causal model that imagines video "
                               "(this bundle is one of the paper's ablations)")
        if not 0 <= self.cfg.imagined_noise < 1 or (self.cfg.imagined_noise
                                                    and self.cfg.video_exec_step < self.cfg.video_steps):
            raise LingbotError("policy: imagined_noise must be in [0, 1) and needs the video denoised in full "
                               f"(video_exec_step == video_steps), got {self.cfg.imagined_noise}")
        warn_untrained(model_cfg, self.cfg)
        self.device = torch.device(device)
        self.dtype = policy_dtype(dtype, self.device)
        self.cameras = list(self.meta["cameras"])
        self.K = int(self.meta["actions_per_chunk"])
        self.frame_stride = int(self.meta["frame_stride"])
        self.model = WorldModel(self.meta["model_config"], cameras=len(self.cameras), actions_per_chunk=self.K)
        state = load_file(str(self.path / "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise LingbotError(f"{self.path / 'model.safetensors'}: weights do not fit the model "
                               f"(missing {missing[:1]}, unexpected {unexpected[:1]})")
        self.model.to(self.device, torch_dtype(self.dtype)).eval()
        self.vae = load_vae(self.path / "vae").to(self.device)
        norm = json.loads((self.path / "normalization.json").read_text())
        self.layout = ChannelLayout(norm["action"], int(self.meta["action_dim"]), self.model.cfg.action_channels)
        self.state_key = self.meta.get("state_key", "observation.state")
        self.state_layout = None  # models without a state input ignore the observation's state
        if self.model.cfg.state_channels:
            self.state_layout = ChannelLayout(norm["state"], len(norm["state"]["q01"]),
                                              self.model.cfg.state_channels, what="state")
        self.tasks = list(self.meta["tasks"])
        self.task_embeddings = load_file(str(self.path / "tasks.safetensors"))["embeddings"]

    def task_embedding(self, task: str) -> torch.Tensor:
        """(1, Lt, text_dim): from the bundle for a trained task, else from the bundle's text encoder."""
        if task in self.tasks:
            emb = self.task_embeddings[self.tasks.index(task)]
        else:
            from lingbot.data.text import embed_tasks

            emb = torch.from_numpy(embed_tasks(self.meta["text_encoder"], [task])[0])
        return emb[None].to(self.device)

    def new_session(self, task: str | None = None, seed: int | None = None) -> "Session":
        return Session(self, task or self.tasks[0], self.cfg.seed if seed is None else seed)

    def autocast(self):
        """The context every world-model call of this policy runs in (autocast is per thread: the
        asynchronous session's worker enters it too)."""
        from lingbot.hardware import autocast

        return autocast(self.device, self.dtype)


def load_policy(path: str | Path, device: str = "cpu", dtype: str = "fp32", **overrides) -> Policy:
    """Load a policy bundle (see lingbot/policy/bundle.py) on `device` with the world model in `dtype`
    (`policy_dtype`); `overrides` change PolicyConfig fields."""
    return Policy(Path(path), device, overrides, dtype)


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
                                          p.layout.robot_dim, r)
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


@torch.no_grad()
def recompute_sequence(model: WorldModel, real: torch.Tensor, executed: torch.Tensor, text: torch.Tensor,
                       x: torch.Tensor, a: torch.Tensor, cfg: PolicyConfig, states=None,
                       action_dim: int | None = None, renoise: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference without a cache: `denoise_chunk` where every Euler step is a teacher-forced forward.

    real (1, k, cams, z, h, w) and executed (1, k, K, A): the grounded history of chunks < k; the chunk
    denoised is k, from noise x, a; states (1, k + 1, S): each chunk's start state (models with a state
    input); action_dim: the robot's action channels; text: the raw task embedding. Costs a
    full-sequence pass per step.
    """
    import copy
    import dataclasses

    model = copy.copy(model)  # same modules, the policy's ring window as the attention window
    model.cfg = dataclasses.replace(model.cfg, window_chunks=cfg.history_chunks)
    n = real.shape[1] + 1
    zeros_t = torch.zeros(1, n, device=x.device)

    def run(video_k, t_video_k, clean_k, t_history_k, action_k, t_action_k):
        clean_video = torch.cat([real, clean_k[:, None]], 1)
        noisy_video = torch.cat([torch.zeros_like(real), video_k[:, None]], 1)
        clean_action = torch.cat([executed, torch.zeros_like(executed[:, :1])], 1)
        noisy_action = torch.cat([torch.zeros_like(executed), action_k[:, None]], 1)
        t_video, t_history, t_action = zeros_t.clone(), zeros_t.clone(), zeros_t.clone()
        t_video[:, -1], t_history[:, -1], t_action[:, -1] = t_video_k, t_history_k, t_action_k
        v, va = model(noisy_video, clean_video, noisy_action, clean_action, t_video, t_action, t_history, text, states)
        return v[:, -1], va[:, -1]

    video = FlowSampler(cfg.video_steps, cfg.shift)
    if model.cfg.video_prediction:
        for i in range(cfg.video_exec_step):
            v, _ = run(x, video.level(i), torch.zeros_like(x), 0.0, a, 0.0)
            x = video.step(x, v, i)
    else:  # nothing imagined; the actions do not attend to this chunk's video
        x = torch.zeros_like(x)
    history, level = imagined_history(x, video.level(cfg.video_exec_step), cfg, renoise)
    act = FlowSampler(cfg.action_steps, cfg.shift, live=action_dim)
    a = act.start(a)
    for i in range(cfg.action_steps):
        _, v = run(torch.zeros_like(x), 0.0, history, level, a, act.level(i))
        a = act.step(a, v, i)
    return a[0], x
