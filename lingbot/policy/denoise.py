"""One chunk denoised by the world model: the video imagined, then the actions decoded from it.

`denoise_chunk` runs against a KV cache of the history (what a session does each chunk: steps 2 and 3
of lingbot/policy/session.py's docstring); `recompute_sequence` is the same chunk without a cache, every
Euler step a teacher-forced forward over the whole sequence (the reference the tests hold the cache
to). Both step the same `FlowSampler`s; `chunk_noise` draws their noise in a fixed order and
`imagined_history` is how the imagined video becomes history for the actions.
"""

from __future__ import annotations

import torch

from lingbot.config import PolicyConfig
from lingbot.model.world_model import FlowSampler, KVCache, WorldModel, start_latents


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
                  renoise: torch.Tensor | None = None, observed: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2 and 3 of a session's chunk (lingbot/policy/session.py) against `cache`: the imagined video
    stays in the cache.
    state (1, S): the robot state the chunk's actions start from (models with a state input);
    action_dim: the robot's action channels (the rest are padding, held at 0 as in training);
    renoise: chunk_noise's third draw (used when `cfg.imagined_noise` > 0);
    observed (1, cams, z, h, w): the real latent frame the chunk starts from (models with keypoints).

    Returns the action chunk (K, A_model) in -1..1 and the imagined latent (1, cams, z, h, w), both on
    the model's device: nothing here waits for the device (the caller reads the actions once).
    """
    window = cfg.history_chunks
    if model.cfg.video_prediction:
        video = FlowSampler(cfg.video_steps, cfg.shift, device=x.device)
        for i in range(cfg.video_exec_step):
            v, _ = model.step(cache, chunk, text, video=x, t_video=video.t(i), window_chunks=window,
                              observed=observed)
            x = video.step(x, v, i)
        history, level = imagined_history(x, video.level(cfg.video_exec_step), cfg, renoise)
        model.step(cache, chunk, text, video=history, t_video=level, clean=True, window_chunks=window)
    else:  # the no-video ablation imagines nothing: the actions read the real history and the state
        x = torch.zeros_like(x)
    act = FlowSampler(cfg.action_steps, cfg.shift, live=action_dim, device=x.device)
    a = act.start(a)
    for i in range(cfg.action_steps):
        _, v = model.step(cache, chunk, text, action=a, t_action=act.t(i), window_chunks=window, state=state,
                          observed=observed)
        a = act.step(a, v, i)
    return a[0], x


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
        observed = start_latents(clean_video) if model.cfg.keypoints else None  # the last chunk's: real[-1]
        v, va = model(noisy_video, clean_video, noisy_action, clean_action, t_video, t_action, t_history, text, states,
                      observed)
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
