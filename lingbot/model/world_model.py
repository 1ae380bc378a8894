"""The LingBot-VA world model: a Mixture-of-Transformers over an interleaved video-action sequence.

Sequence. Chunks k = 0..n-1, each `[video tokens of latent frame k][action tokens of chunk k]`.
Video tokens: the latent frame of every camera, patchified 1x2x2 (as Wan); action tokens: one per
action step, k_act = 4 per latent frame (chunk 0 has none: its action tokens are masked out).

Experts. Video tokens go through the video expert (width Dv), action tokens through the action expert
(width Da < Dv). Per layer each expert has its own norms, AdaLN timestep modulation, QKV and output
projections and FFN; attention is one softmax over the tokens of both streams in a shared head space
(heads x head_dim). The video expert also cross-attends to the task text (as Wan does, so Wan weights
map onto it); the action expert has no cross-attention: it reads the task through the joint attention
to video tokens, which is what keeps it at ~350M parameters at paper scale.

Proprioception. The robot state each chunk's actions start from (that of the previous latent frame's
last camera frame, `LatentWindows.window`'s start_state) is projected to the action width and added to every action
token of the chunk, noisy and clean: the action expert decodes the actions that realise the imagined
video from where the arm actually is. The video expert never sees it (it predicts the cameras).

Keypoints (`ModelConfig.keypoints` > 0). The latent frame each chunk starts from (that of the previous
chunk: the last real observation before chunk k's actions) is read by a small conv stack ending in
spatial-softmax keypoints (lingbot/model/keypoints.py), projected to each width and added to the chunk's
noisy video and noisy action tokens: where the puck and the gripper are, finer than one 2x2 patch token.
The clean history does not carry them, so the KV cache is as without them.

Teacher forcing (training). One pass over `[noisy video, clean video, noisy action, clean action]`,
block id 2k for video of chunk k and 2k+1 for its actions:
    clean -> clean : block(key) <= block(query)            (block-causal history)
    noisy -> clean : block(key) <  block(query)            (strictly earlier clean blocks)
    noisy -> noisy : same block only
    clean -> noisy : never
so noisy video k is predicted from the history (visual dynamics) and noisy action k is decoded from
the clean video of chunk k and earlier (inverse dynamics). `attention_mask` is the one place that
builds these rules. Imagined futures (`TrainConfig.imagined_future_p`, off by default) add a third
video copy, the model's own prediction of each chunk, which noisy action k reads in place of the
recorded video k, as at run time.

Flow matching. x_t = (1 - t) x + t eps, target v = eps - x, independent t per chunk and stream from a
shifted schedule; loss = w_v * video + w_a * action, the action term masked to existing steps and used
channels (padding channels stay 0, noisy or clean: `FlowSampler` keeps them so at run time); the
first chunk of a window is context only, not a target. Noisy-history augmentation re-noises the clean
video history to a level in [0, 0.5] (and tells the model), so actions can be decoded from partially
denoised video at inference.

Shapes: B batch, n chunks, C cameras, z latent channels, (h, w) latent size, K actions per chunk,
A action channels, Tv = C*(h/2)*(w/2) video tokens per chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lingbot.config import ModelConfig

NOISY, CLEAN = 0, 1
HISTORY_NOISE_MAX = 0.5  # noisy-history augmentation re-noises the clean video history to at most this
VIDEO, ACTION = 0, 1


# ----------------------------------------------------------------------------------------------------
# Masks: the only place that decides who attends to whom.


def attention_mask(block: torch.Tensor, clean: torch.Tensor, window_chunks: int = 0,
                   query_block: torch.Tensor | None = None, query_clean: torch.Tensor | None = None,
                   attention: str = "causal", video_prediction: bool = True,
                   imagined: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (Lq, L) mask, True = may attend, from per-token block ids and clean flags (both (L,)).

    Queries are the same tokens as the keys unless `query_block` / `query_clean` name others (the
    incremental step: new tokens against cache + new). The paper's two ablations (ModelConfig):
    attention "bidirectional": the clean history, every chunk before the window's last, attends both
    ways (no KV cache is possible: the policy recomputes the window), while the last chunk's clean
    tokens, the teacher-forced truth of the one chunk trained (`flow_matching_loss`), stay causal and
    unseen by the history: were they seen, the history would carry the target's video and actions to
    the noisy tokens, which nothing carries at run time. video_prediction False: noisy actions of
    chunk k attend to clean blocks before chunk k's video (history and state only, no video k).

    window_chunks W > 0: a query of chunk c sees chunks c-W+1..c only, each whole (its video and its
    actions), in training and in the policy's KV-cache ring alike (`Session` evicts by the same rule).

    imagined (L,) bool, queries = keys (training with `TrainConfig.imagined_future_p`): video tokens of
    a third copy, flagged clean, that stand in for chunk k's own video where its noisy actions read it,
    as at run time, where those actions read the video the model imagined: an imagined token sees the
    clean blocks before its own and the imagined tokens of its block (what the imagined chunk saw when
    it was written into the cache), and is seen only by its own chunk's noisy actions, which no longer
    see the recorded video of their chunk. Every later chunk reads the recorded video, as a session
    grounds the real frame before the next chunk.
    """
    if query_block is None:
        query_block, query_clean = block, clean
    bq, bk = query_block[:, None], block[None, :]
    cq, ck = query_clean[:, None], clean[None, :]
    clean_to_clean = bk <= bq
    if attention == "bidirectional":
        last = 2 * (int(block.max()) // 2)  # the last chunk's video block
        clean_to_clean = clean_to_clean | ((bk < last) & (bq < last))
    # Actions have odd block ids (2k + 1): without video prediction they skip their own chunk's video (2k).
    earlier = bk < bq - 1 if not video_prediction else bk < bq
    noisy_to_clean = torch.where(bq % 2 == 1, earlier, bk < bq)
    allowed = (cq & ck & clean_to_clean) | (~cq & ck & noisy_to_clean) | (~cq & ~ck & (bk == bq))
    if imagined is not None:
        iq, ik = imagined[:, None], imagined[None, :]
        own_actions = ~cq & (bq % 2 == 1) & (bk == bq - 1)  # noisy actions of chunk k, video of chunk k
        allowed = torch.where(iq, (ik & (bk == bq)) | (~ik & ck & (bk < bq)),  # imagined queries
                              torch.where(ik, own_actions, allowed & ~(own_actions & ck)))
    if window_chunks > 0:
        allowed &= (bq // 2 - bk // 2) < window_chunks
    return allowed


# ----------------------------------------------------------------------------------------------------
# Positions: 3D RoPE for video (frame, h, w), 1D for actions on the same time axis.


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """positions (L, 3) float (time, row, col) -> angles (L, head_dim // 2).

    The head dim is split as in Wan: a third of the rotary pairs for each axis (time gets the rest).
    Action tokens carry row = col = 0, so only their time part rotates: they share the video's clock.
    """
    pairs = head_dim // 2
    split = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]
    out = []
    for axis, n in enumerate(split):
        freqs = 1.0 / theta ** (torch.arange(n, dtype=torch.float64, device=positions.device) / max(n, 1))
        out.append(positions[:, axis : axis + 1].double() * freqs[None, :])
    return torch.cat(out, dim=1).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D), angles (L, D/2): rotate consecutive pairs."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of flow times t in [0, 1] (scaled to 0..1000 as diffusion models do)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * 1000 * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


# ----------------------------------------------------------------------------------------------------
# One expert's half of a layer.


class CrossAttention(nn.Module):
    """Queries from the stream, keys/values from the task text; RMS-normed q and k (Wan's attn2)."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(width, inner), nn.Linear(width, inner), nn.Linear(width, inner)
        self.norm_q, self.norm_k = nn.RMSNorm(inner, eps=1e-6), nn.RMSNorm(inner, eps=1e-6)
        self.to_out = nn.Linear(inner, width)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        def heads(t):
            return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

        q = heads(self.norm_q(self.to_q(x)))
        k, v = heads(self.norm_k(self.to_k(text))), heads(self.to_v(text))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class ExpertLayer(nn.Module):
    def __init__(self, width: int, ffn: int, heads: int, head_dim: int, cross: bool):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.to_q = nn.Linear(width, inner)
        self.to_k = nn.Linear(width, inner)
        self.to_v = nn.Linear(width, inner)
        self.norm_q = nn.RMSNorm(inner, eps=1e-6)
        self.norm_k = nn.RMSNorm(inner, eps=1e-6)
        self.to_out = nn.Linear(inner, width)
        self.cross = None
        if cross:  # cross-attention to the task text (video expert only)
            self.norm_cross = nn.LayerNorm(width, eps=1e-6)
            self.cross = CrossAttention(width, heads, head_dim)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, width))
        # AdaLN: shift/scale/gate for attention and FFN, added to a learned table (Wan's layout).
        self.modulation = nn.Parameter(torch.randn(1, 6, width) / width**0.5)

    def qkv(self, x: torch.Tensor, mod: torch.Tensor, angles: torch.Tensor):
        """x (B, L, D), mod (B, L, 6, D) -> q, k, v (B, H, L, hd) with RoPE on q and k."""
        shift, scale = mod[:, :, 0], mod[:, :, 1]
        h = self.norm1(x) * (1 + scale) + shift
        B, L, _ = x.shape

        def heads(t):
            return t.view(B, L, self.heads, self.head_dim).transpose(1, 2)

        q = heads(self.norm_q(self.to_q(h)))
        k = heads(self.norm_k(self.to_k(h)))
        v = heads(self.to_v(h))
        return apply_rope(q, angles), apply_rope(k, angles), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor, mod: torch.Tensor, text: torch.Tensor | None):
        """Residual attention output, cross-attention, then the modulated FFN. attn: (B, L, H*hd)."""
        x = x + self.to_out(attn) * mod[:, :, 2]
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), text)
        h = self.norm2(x) * (1 + mod[:, :, 4]) + mod[:, :, 3]
        return x + self.ffn(h) * mod[:, :, 5]


class MoTLayer(nn.Module):
    """Video expert + action expert, joined by one attention over both streams."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.video = ExpertLayer(cfg.video_width, cfg.video_ffn, cfg.heads, cfg.head_dim, cross=True)
        self.action = ExpertLayer(cfg.action_width, cfg.action_ffn, cfg.heads, cfg.head_dim, cross=False)

    def forward(self, xv, xa, mod_v, mod_a, angles_v, angles_a, mask, text, cache=None, index=0):
        """Returns (xv, xa). With a KVCache, the new tokens attend to layer `index`'s cached keys and
        values first (mask columns: cache, new) and their own keys/values (RoPE applied) are written
        after them."""
        # An incremental step may carry one stream only: the other expert is skipped entirely.
        parts = [expert.qkv(x, mod + expert.modulation, angles) for expert, x, mod, angles in
                 ((self.video, xv, mod_v, angles_v), (self.action, xa, mod_a, angles_a)) if x.shape[1]]
        q, k, v = (torch.cat(p, dim=2) if len(p) > 1 else p[0] for p in zip(*parts))  # (B, H, Lv+La, hd)
        keys, values = (k, v) if cache is None else cache.extend(index, k, v)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.transpose(1, 2).flatten(2)  # (B, Lv+La, H*hd)
        Lv = xv.shape[1]
        if Lv:
            xv = self.video.finish(xv, out[:, :Lv], mod_v + self.video.modulation, text)
        if xa.shape[1]:
            xa = self.action.finish(xa, out[:, Lv:], mod_a + self.action.modulation, None)
        return xv, xa


class KVCache:
    """Keys and values of the history (clean tokens) for every layer, with each token's block id.

    Entries are appended in sequence order; `truncate` drops the newest (an imagined chunk being
    replaced by the real one), `evict_before` the oldest (the ring window of an endless episode).
    Attention over the cache is order-free (RoPE carries the positions), so both are slices. Storage
    is a buffer per layer grown by doubling: a step writes its new keys after the cached ones and
    attends to a view, instead of copying the whole history every call.
    """

    MEMO_SIZE = 16  # a chunk's steps use ~4 distinct (tokens, mask) plans

    def __init__(self, depth: int):
        self.depth = depth
        self.buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * depth
        self.block = torch.zeros(0, dtype=torch.long)  # on the CPU: masks are planned on the host
        self.memo: dict = {}  # the model's per-step plans (layout, angles, masks) on the device

    def remember(self, key, value) -> None:
        """Keep a step plan; the oldest goes when there are MEMO_SIZE."""
        if len(self.memo) >= self.MEMO_SIZE:
            self.memo.pop(next(iter(self.memo)))
        self.memo[key] = value

    def __len__(self) -> int:
        return len(self.block)

    def extend(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys/values of cache + new tokens (views), with the new ones written after the cache.

        Writing does not commit them: only `commit` (clean tokens) makes them part of the history.
        """
        n, new = len(self), k.shape[2]
        buf = self.buffers[i]
        if buf is None or buf[0].shape[2] < n + new or buf[0].shape[0] != k.shape[0]:
            size = max(64, 2 * (n + new))
            grown = tuple(t.new_empty(t.shape[0], t.shape[1], size, t.shape[3]) for t in (k, v))
            if buf is not None and n:
                grown[0][:, :, :n], grown[1][:, :, :n] = buf[0][:, :, :n], buf[1][:, :, :n]
            buf = self.buffers[i] = grown
        buf[0][:, :, n : n + new], buf[1][:, :, n : n + new] = k, v
        return buf[0][:, :, : n + new], buf[1][:, :, : n + new]

    def commit(self, block: torch.Tensor) -> None:
        """The tokens written by the last `extend` of every layer become history."""
        self.block = torch.cat([self.block, block.cpu()])

    def truncate(self, length: int) -> None:
        """Keep the first `length` entries."""
        self.block = self.block[:length]

    def evict_before(self, block: int) -> None:
        """Drop every entry whose block id is below `block`."""
        drop = int((self.block < block).sum())
        if drop:
            keep = len(self) - drop
            for i, buf in enumerate(self.buffers):
                if buf is not None:
                    for t in buf:
                        t[:, :, :keep] = t[:, :, drop : drop + keep].clone()
            self.block = self.block[drop:]


# ----------------------------------------------------------------------------------------------------
# The model.


class WorldModel(nn.Module):
    def __init__(self, cfg: ModelConfig, cameras: int = 1, actions_per_chunk: int = 4):
        super().__init__()
        self.cfg, self.cameras, self.K = cfg, cameras, actions_per_chunk
        ph, pw = cfg.patch
        self.patch_dim = cfg.latent_channels * ph * pw
        Dv, Da = cfg.video_width, cfg.action_width
        self.video_in = nn.Linear(self.patch_dim, Dv)
        self.action_in = nn.Linear(cfg.action_channels, Da)
        # Proprioception enters the action expert only: the video expert predicts what the cameras see.
        # Zero-initialised, so a model (or one initialised from a video model) starts without it.
        self.state_in = nn.Linear(cfg.state_channels, Da) if cfg.state_channels else None
        if self.state_in is not None:
            nn.init.zeros_(self.state_in.weight)
            nn.init.zeros_(self.state_in.bias)
        # Keypoints of the frame a chunk starts from, into its noisy tokens (zero-initialised projections).
        self.keypoint_net = self.keypoints_v = self.keypoints_a = None
        if cfg.keypoints:
            from lingbot.model.keypoints import LatentKeypoints

            self.keypoint_net = LatentKeypoints(cfg.latent_channels, cfg.keypoints)
            self.keypoints_v = nn.Linear(cameras * 2 * cfg.keypoints, Dv)
            self.keypoints_a = nn.Linear(cameras * 2 * cfg.keypoints, Da)
            for layer in (self.keypoints_v, self.keypoints_a):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.text_in = nn.Sequential(nn.Linear(cfg.text_dim, Dv), nn.GELU(approximate="tanh"), nn.Linear(Dv, Dv))
        # The task joins the timestep conditioning of both experts (AdaLN): a pooled encoder gives one
        # text token, and a softmax over one key makes cross-attention a constant per task whatever the
        # query. Zero-initialised: a model starts (and a Wan initialisation stays) as without it.
        self.text_mod_v = self.text_mod_a = None
        if cfg.text_modulation:
            self.text_mod_v, self.text_mod_a = nn.Linear(Dv, Dv), nn.Linear(Dv, Da)
            for layer in (self.text_mod_v, self.text_mod_a):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.camera_embed = nn.Parameter(torch.zeros(cameras, Dv))
        # Timestep conditioning in Wan's layout: embed (Linear, SiLU, Linear), then per-layer AdaLN
        # parameters from proj (SiLU, Linear to 6 x width); the output norm is modulated by the embedding.
        self.time_embed_v = nn.Sequential(nn.Linear(cfg.freq_dim, Dv), nn.SiLU(), nn.Linear(Dv, Dv))
        self.time_proj_v = nn.Sequential(nn.SiLU(), nn.Linear(Dv, 6 * Dv))
        self.time_embed_a = nn.Sequential(nn.Linear(cfg.freq_dim, Da), nn.SiLU(), nn.Linear(Da, Da))
        self.time_proj_a = nn.Sequential(nn.SiLU(), nn.Linear(Da, 6 * Da))
        self.layers = nn.ModuleList(MoTLayer(cfg) for _ in range(cfg.depth))
        self.norm_v = nn.LayerNorm(Dv, elementwise_affine=False, eps=1e-6)
        self.norm_a = nn.LayerNorm(Da, elementwise_affine=False, eps=1e-6)
        self.video_out = nn.Linear(Dv, self.patch_dim)
        self.action_out = nn.Linear(Da, cfg.action_channels)
        self.out_modulation_v = nn.Parameter(torch.randn(1, 2, Dv) / Dv**0.5)
        self.out_modulation_a = nn.Parameter(torch.randn(1, 2, Da) / Da**0.5)
        for head in (self.video_out, self.action_out):  # start as a zero velocity field
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    # -- token layout ------------------------------------------------------------------------------

    def patchify(self, video: torch.Tensor) -> torch.Tensor:
        """(B, n, C, z, h, w) -> (B, n, Tv, z*ph*pw), tokens ordered camera, row, col."""
        B, n, C, z, h, w = video.shape
        ph, pw = self.cfg.patch
        x = video.view(B, n, C, z, h // ph, ph, w // pw, pw)
        return x.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(B, n, C * (h // ph) * (w // pw), z * ph * pw)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        B, n, _, _ = tokens.shape
        ph, pw = self.cfg.patch
        C, z = self.cameras, self.cfg.latent_channels
        x = tokens.view(B, n, C, h // ph, w // pw, z, ph, pw)
        return x.permute(0, 1, 2, 5, 3, 6, 4, 7).reshape(B, n, C, z, h, w)

    def layout(self, n: int, h: int, w: int, device, first: int = 0) -> dict:
        """Per-token block ids, positions and camera ids for chunks first..first+n-1 of one stream copy."""
        ph, pw = self.cfg.patch
        gh, gw = h // ph, w // pw
        chunk = torch.arange(first, first + n, device=device)
        rows = torch.arange(gh, device=device).repeat_interleave(gw).repeat(self.cameras)
        cols = torch.arange(gw, device=device).repeat(gh).repeat(self.cameras)
        cams = torch.arange(self.cameras, device=device).repeat_interleave(gh * gw)
        Tv = len(rows)
        video_pos = torch.stack([chunk.repeat_interleave(Tv).float(), rows.repeat(n).float(),
                                 cols.repeat(n).float()], dim=1)
        # Action j of chunk k happens between latent frames k-1 and k: time k - 1 + (j + 1) / K.
        step = torch.arange(self.K, device=device)
        t_action = (chunk[:, None] - 1 + (step[None, :] + 1) / self.K).flatten().float()
        action_pos = torch.stack([t_action, torch.zeros_like(t_action), torch.zeros_like(t_action)], dim=1)
        return {
            "video_block": (2 * chunk).repeat_interleave(Tv),
            "action_block": (2 * chunk + 1).repeat_interleave(self.K),
            "video_pos": video_pos,
            "action_pos": action_pos,
            "cams": cams.repeat(n),
            "Tv": Tv,
        }

    @staticmethod
    def _out_norm(norm, x, emb, table):
        """Final norm modulated by the timestep embedding: Wan's norm_out + scale_shift_table."""
        shift, scale = (table[None] + emb[:, :, None]).unbind(2)  # (B, L, D) each
        return norm(x) * (1 + scale) + shift

    # -- forward -----------------------------------------------------------------------------------

    def _conditioning(self, emb, text, table):
        """Time embedding (B, L, D) + the task (`text`: encode_text's (B, Lt, Dv), pooled) through `table`."""
        return emb if table is None else emb + table(text.mean(1))[:, None]

    def keypoints(self, observed: torch.Tensor | None) -> torch.Tensor | None:
        """observed (B, n, C, z, h, w): the latent frame each chunk starts from -> (B, n, C*2*keypoints)
        keypoints, or None for a model without them."""
        if self.keypoint_net is None:
            return None
        if observed is None:
            raise ValueError(f"the model reads keypoints ({self.cfg.keypoints} channels): pass observed")
        return self.keypoint_net(observed)

    def _video_tokens(self, video, t, lay, text, points=None):
        """video (B, n, C, z, h, w) at flow times t (B, n) -> tokens (B, n*Tv, Dv), time emb, AdaLN mod;
        points (B, n, P): the chunks' keypoints (noisy tokens of a model with them)."""
        x = self.video_in(self.patchify(video).flatten(1, 2)) + self.camera_embed[lay["cams"]]
        if points is not None:
            x = x + self.keypoints_v(points).repeat_interleave(lay["Tv"], 1)
        emb = self.time_embed_v(timestep_embedding(t.repeat_interleave(lay["Tv"], 1), self.cfg.freq_dim))
        emb = self._conditioning(emb, text, self.text_mod_v)
        return x, emb, self.time_proj_v(emb).unflatten(-1, (6, -1))  # mod (B, L, 6, Dv)

    def _action_tokens(self, action, t, text, state=None, points=None):
        """action (B, n, K, A) at flow times t (B, n), state (B, n, S) each chunk starts from ->
        tokens (B, n*K, Da), time emb, AdaLN mod; points as `_video_tokens`."""
        x = self.action_in(action.flatten(1, 2))
        if points is not None:
            x = x + self.keypoints_a(points).repeat_interleave(self.K, 1)
        if self.state_in is not None:
            if state is None:
                raise ValueError(f"the model takes the robot state ({self.cfg.state_channels} channels): pass state")
            x = x + self.state_in(state).repeat_interleave(self.K, 1)
        emb = self.time_embed_a(timestep_embedding(t.repeat_interleave(self.K, 1), self.cfg.freq_dim))
        emb = self._conditioning(emb, text, self.text_mod_a)
        return x, emb, self.time_proj_a(emb).unflatten(-1, (6, -1))

    def _heads(self, xv, xa, emb_v, emb_a):
        v_video = self.video_out(self._out_norm(self.norm_v, xv, emb_v, self.out_modulation_v))
        v_action = self.action_out(self._out_norm(self.norm_a, xa, emb_a, self.out_modulation_a))
        return v_video, v_action

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Cached task embedding (B, Lt, text_dim) -> the video expert's cross-attention context."""
        return self.text_in(text)

    def forward(self, noisy_video, clean_video, noisy_action, clean_action, t_video, t_action,
                t_history, text, state=None, observed=None, imagined=None):
        """Teacher-forced velocity prediction.

        noisy_video, clean_video: (B, n, C, z, h, w); noisy_action, clean_action: (B, n, K, A);
        t_video, t_action: (B, n) flow times of the noisy chunks; t_history: (B, n) the level the clean
        video history was re-noised to (0 = clean); text: (B, Lt, text_dim); state: (B, n, S) the
        robot state chunk k's actions start from (the batch's start_state), for both action copies;
        observed: (B, n, C, z, h, w) the latent frame chunk k starts from (models with keypoints);
        imagined: (B, n, C, z, h, w) the video each chunk's noisy actions read in place of its recorded
        clean_video, at level t_history (`attention_mask`'s imagined copy; None: the recorded one).
        Returns (v_video (B, n, C, z, h, w), v_action (B, n, K, A)).
        """
        B, n, C, z, h, w = noisy_video.shape
        lay = self.layout(n, h, w, noisy_video.device)
        Tv, K = lay["Tv"], self.K
        text = self.encode_text(text)
        points = self.keypoints(observed)
        streams = [self._video_tokens(noisy_video, t_video, lay, text, points),
                   self._video_tokens(clean_video, t_history, lay, text)]
        if imagined is not None:
            streams.append(self._video_tokens(imagined, t_history, lay, text))
        xv, emb_v, mod_v = (torch.cat(p, 1) for p in zip(*streams))
        copies = len(streams)  # video copies: noisy, clean (and imagined)
        streams = [self._action_tokens(noisy_action, t_action, text, state, points),
                   self._action_tokens(clean_action, torch.zeros_like(t_action), text, state)]
        xa, emb_a, mod_a = (torch.cat(p, 1) for p in zip(*streams))

        vb, ab = lay["video_block"], lay["action_block"]
        block = torch.cat([vb.repeat(copies), ab, ab])
        clean = torch.cat([torch.zeros_like(vb), torch.ones_like(vb).repeat(copies - 1), torch.zeros_like(ab),
                           torch.ones_like(ab)]).bool()
        kind = None
        if imagined is not None:
            kind = torch.zeros_like(clean)
            kind[2 * len(vb) : 3 * len(vb)] = True
        mask = attention_mask(block, clean, self.cfg.window_chunks, attention=self.cfg.attention,
                              video_prediction=self.cfg.video_prediction, imagined=kind)
        angles_v = rope_angles(lay["video_pos"].repeat(copies, 1), self.cfg.head_dim).to(xv.device)
        angles_a = rope_angles(lay["action_pos"].repeat(2, 1), self.cfg.head_dim).to(xv.device)

        for layer in self.layers:
            xv, xa = layer(xv, xa, mod_v, mod_a, angles_v, angles_a, mask, text)
        v_video, v_action = self._heads(xv[:, : n * Tv], xa[:, : n * K], emb_v[:, : n * Tv], emb_a[:, : n * K])
        v_video, v_action = v_video.view(B, n, Tv, -1), v_action.view(B, n, K, -1)
        return self.unpatchify(v_video, h, w), v_action

    # -- incremental steps ---------------------------------------------------------------------------
    # A chunk takes ~20 steps (video and action denoising, writing history) with the same tokens against
    # the same cache: their layout, RoPE angles and mask are built once, on the device, and reused
    # (`KVCache.memo`), so a denoising step makes no host-device copy and no synchronisation.

    def _step_tokens(self, cache, chunk: int, h: int, w: int, dev, has_video: bool, has_action: bool):
        """(layout on the device, new tokens' block ids (CPU), RoPE angles of the video and action
        tokens (device)) of a step over chunk `chunk`'s video and/or action tokens."""
        key = ("tokens", chunk, h, w, has_video, has_action, str(dev))
        if key not in cache.memo:
            lay = self.layout(1, h, w, dev, first=chunk)
            ph, pw = self.cfg.patch
            tv = self.cameras * (h // ph) * (w // pw) if has_video else 0
            new_block = torch.cat([torch.full((tv,), 2 * chunk, dtype=torch.long),
                                   torch.full((self.K if has_action else 0,), 2 * chunk + 1, dtype=torch.long)])
            empty = torch.zeros(0, 3, device=dev)
            angles_v = rope_angles(lay["video_pos"] if has_video else empty, self.cfg.head_dim)
            angles_a = rope_angles(lay["action_pos"] if has_action else empty, self.cfg.head_dim)
            cache.remember(key, (lay, new_block, angles_v, angles_a))
        return cache.memo[key]

    def _step_mask(self, cache, chunk: int, new_block: torch.Tensor, clean: bool, window_chunks: int, dev):
        """The step's (new tokens, cache + new tokens) mask from `attention_mask` on the device, or None when
        every key is visible. It depends on the blocks relative to the chunk only: the steady state of a
        ring window reuses one mask chunk after chunk."""
        offset = 2 * chunk
        key = ("mask", clean, window_chunks, str(dev), (cache.block - offset).numpy().tobytes(),
               (new_block - offset).numpy().tobytes())
        if key not in cache.memo:
            block = torch.cat([cache.block, new_block])
            flags = torch.cat([torch.ones(len(cache), dtype=torch.bool),
                               torch.full_like(new_block, clean, dtype=torch.bool)])
            mask = attention_mask(block, flags, window_chunks, new_block, flags[len(cache):],
                                  video_prediction=self.cfg.video_prediction)
            cache.remember(key, None if bool(mask.all()) else mask.to(dev))
        return cache.memo[key]

    def step(self, cache: KVCache, chunk: int, text: torch.Tensor, video=None, t_video=None, action=None,
             t_action=None, clean: bool = False, window_chunks: int = 0, state=None, observed=None):
        """One incremental pass over tokens of chunk `chunk` against the cached history (inference).

        video (B, C, z, h, w) at flow time t_video (B,) and/or action (B, K, A) at t_action (B,) with
        the state (B, S) the chunk's actions start from, and for noisy tokens of a model with keypoints
        the latent frame (B, C, z, h, w) the chunk starts from; text from `encode_text`. Noisy tokens
        (clean=False) attend to the cache and to each other; clean tokens (clean=True: history, or an imagined chunk at history level t_video) are appended to the
        cache. The mask comes from `attention_mask`, as in training, so this equals the teacher-forced
        forward over the whole sequence. Returns (v_video (B, C, z, h, w) | None, v_action (B, K, A) | None).
        """
        dev = text.device
        B = text.shape[0]
        h, w = video.shape[-2:] if video is not None else self.cfg.patch
        if self.cfg.attention != "causal":
            raise ValueError("a bidirectional model has no incremental step: recompute the window (forward)")
        lay, new_block, angles_v, angles_a = self._step_tokens(cache, chunk, h, w, dev, video is not None,
                                                               action is not None)
        mask = self._step_mask(cache, chunk, new_block, clean, window_chunks, dev)
        Dv, Da = self.cfg.video_width, self.cfg.action_width
        points = None if clean else self.keypoints(None if observed is None else observed[:, None])
        if video is not None:
            xv, emb_v, mod_v = self._video_tokens(video[:, None], t_video[:, None], lay, text, points)
        else:
            xv, emb_v, mod_v = (torch.zeros(B, 0, *s, device=dev) for s in ((Dv,), (Dv,), (6, Dv)))
        if action is not None:
            xa, emb_a, mod_a = self._action_tokens(action[:, None], t_action[:, None], text,
                                                   None if state is None else state[:, None], points)
        else:
            xa, emb_a, mod_a = (torch.zeros(B, 0, *s, device=dev) for s in ((Da,), (Da,), (6, Da)))
        for i, layer in enumerate(self.layers):
            xv, xa = layer(xv, xa, mod_v, mod_a, angles_v, angles_a, mask, text, cache=cache, index=i)
        if clean:
            cache.commit(new_block)
        v_video, v_action = self._heads(xv, xa, emb_v, emb_a)
        out_v = self.unpatchify(v_video[:, None], h, w)[:, 0] if video is not None else None
        out_a = v_action if action is not None else None
        return out_v, out_a


def compile_experts(model: WorldModel, backend: str = "inductor") -> None:
    """`torch.compile` each expert's projections and FFN half (`qkv`, `finish`) in place, for inference.

    Their token counts are fixed per kind of step (a video chunk, an action chunk, both), so each
    compiles once per shape; the attention over the growing KV cache stays eager. The recompile limit
    is raised to hold every (expert width x step kind) shape. `backend="eager"` traces without
    generating code (the CPU check of the GPU run's compiled variant)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    for layer in model.layers:
        for expert in (layer.video, layer.action):
            expert.qkv = torch.compile(expert.qkv, backend=backend)
            expert.finish = torch.compile(expert.finish, backend=backend)


def count_parameters(model: WorldModel) -> dict[str, int]:
    """Parameters of the video expert (with its embeddings and heads) and of the action expert."""
    action = sum(p.numel() for name, p in model.named_parameters()
                 if ".action." in name or name.startswith(("action_in", "state_in", "action_out", "time_embed_a",
                                                            "time_proj_a", "out_modulation_a")))
    total = sum(p.numel() for p in model.parameters())
    return {"video": total - action, "action": action, "total": total}


# ----------------------------------------------------------------------------------------------------
# Flow matching.


def sample_times(shape, shift: float, generator=None, device=None) -> torch.Tensor:
    """Shifted uniform flow times: t = s u / (1 + (s - 1) u), u ~ U(0, 1); s > 1 favours noisier t."""
    u = torch.rand(shape, generator=generator, device=device)
    return shift * u / (1 + (shift - 1) * u)


def draw_noise(batch: dict, action_channels: int, shift: float, history_noise_p: float,
               generator: torch.Generator | None = None, chunk_noise_p: float = 0.0,
               chunk_noise_max: float = 1.0, batch_size: int | None = None,
               action_history_dropout: float = 0.0, imagined_future_p: float = 0.0) -> dict:
    """Every random draw of one teacher-forced step, for the whole (global) batch, on the CPU.

    Drawn apart from the loss so that data-parallel ranks can draw the global batch's noise from one
    seeded generator and each take its own rows: N processes then compute exactly what one would.
    `batch_size`: the global batch's rows when `batch` holds only this process's (default: its own).
    """
    video, actions = batch["video"], batch["actions"]
    B, n = batch_size or video.shape[0], video.shape[1]
    g = generator
    video_shape = (B, *video.shape[1:])
    action_shape = (B, *actions.shape[1:-1], action_channels)
    noise = {
        "t_video": sample_times((B, n), shift, g),
        "t_action": sample_times((B, n), shift, g),
        "eps_video": torch.randn(video_shape, generator=g),
        "eps_action": torch.randn(action_shape, generator=g),
        "history": (torch.rand(B, generator=g) < history_noise_p) * torch.rand(B, generator=g) * HISTORY_NOISE_MAX,
        "eps_history": torch.randn(video_shape, generator=g),
        # drawn last: the draws above are the same with or without per-chunk noise
        "chunk_history": (torch.rand(B, n, generator=g) < chunk_noise_p) * torch.rand(B, n, generator=g)
        * chunk_noise_max,
    }
    if action_history_dropout > 0:  # after the rest, and absent when off: the draws above do not move
        noise["action_history_keep"] = torch.rand(B, n, generator=g) >= action_history_dropout
    if imagined_future_p > 0:  # likewise
        noise["imagined_future"] = torch.rand(B, generator=g) < imagined_future_p
    return noise


def pad_channels(x: torch.Tensor, channels: int, what: str) -> torch.Tensor:
    """(..., c) -> (..., channels): the robot's channels first, the rest zero (unused padding)."""
    if x.shape[-1] > channels:
        raise ValueError(f"robot {what} has {x.shape[-1]} channels, the model only {channels}")
    return F.pad(x, (0, channels - x.shape[-1]))


class FlowSampler:
    """The Euler sampler of one flow, shared by the real-time session and the no-cache reference.

    Times run 1 -> 0 in `steps` steps, shifted like training's (s > 1: more steps at high noise): they are
    diffusers' `FlowMatchEulerDiscreteScheduler` sigmas for our shift over evenly spaced times (the same
    float32 values as `shift * u / (1 + (shift - 1) * u)`, and its Euler step gives the same samples:
    tests/test_model.py). The step here multiplies by a Python float, so a step on a GPU sends nothing.
    Channels at and past `live` are padding (a robot with fewer action channels than the model): training
    holds them at exactly 0 in clean and noisy tokens alike (`flow_matching_loss`), so the sampler does
    too, from the first step to the last.
    """

    def __init__(self, steps: int, shift: float, live: int | None = None, device=None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist())
        self.times = scheduler.sigmas.float()  # (steps + 1,), ending at 0, on the CPU: the step sizes
        # One copy to the device per sampler; a step then sends nothing (`t` slices it, `step` multiplies
        # by a Python float: the same float32 value the CPU tensor holds).
        self.device_times = self.times.to(device) if device is not None else self.times
        self.live = live

    def _live_only(self, x: torch.Tensor) -> torch.Tensor:
        if self.live is None or self.live >= x.shape[-1]:
            return x
        return torch.cat([x[..., : self.live], torch.zeros_like(x[..., self.live :])], dim=-1)

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """The sample at t = 1: the noise, padding channels at 0."""
        return self._live_only(noise)

    def t(self, i: int) -> torch.Tensor:
        """(1,) flow time before step i (i = steps: where the sampler ends), on the sampler's device."""
        return self.device_times[i : i + 1]

    def level(self, i: int) -> float:
        """The flow time before step i as a number (no device involved)."""
        return float(self.times[i])

    def step(self, x: torch.Tensor, velocity: torch.Tensor, i: int) -> torch.Tensor:
        """Euler step i: x at t_i -> x at t_{i+1}."""
        return self._live_only(x + float(self.times[i + 1] - self.times[i]) * velocity)


def start_latents(video: torch.Tensor) -> torch.Tensor:
    """(B, n, C, z, h, w) latents of a window -> the latent frame each chunk starts from, what a model's
    keypoints read: chunk k's is frame k - 1 (chunk 0, context only, its own)."""
    return torch.cat([video[:, :1], video[:, :-1]], 1)


def noised(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x (B, n, ...) at flow times t (B, n): (1 - t) x + t eps."""
    t = t.view(*t.shape, *([1] * (x.dim() - t.dim())))
    return (1 - t) * x + t * eps


def imagine_futures(model: WorldModel, args: tuple, noise: dict) -> torch.Tensor:
    """The video each chunk's noisy actions read when training against the model's own imagination
    (`TrainConfig.imagined_future_p`): a pass without gradient predicts every chunk's video from its
    history, as the session does before decoding actions; its clean estimate x_t - t v, re-noised to the
    chunk's history level, replaces the recorded future in the rows drawn (`noise["imagined_future"]`).

    One Euler step from the training noise level, not the session's full sampler: at the high levels
    the shifted schedule favours it is the model's expectation of the next frame given the history,
    the average of the futures it cannot tell apart, which is what a wrong imagined future looks like.
    """
    if not getattr(model, "module", model).cfg.video_prediction:  # unwrap DDP
        raise ValueError("imagined_future_p needs a model that imagines video (model.video_prediction)")
    noisy_v, clean_v, _, _, t_v, _, t_h = args[:7]
    with torch.no_grad():
        pred_v, _ = model(*args)
    guess = noisy_v - t_v.view(*t_v.shape, 1, 1, 1, 1) * pred_v.to(noisy_v.dtype)  # x = x_t - t v
    guess = noised(guess, noise["eps_history"], t_h)
    rows = noise["imagined_future"].view(-1, 1, 1, 1, 1, 1)
    return torch.where(rows, guess, clean_v).detach()


def flow_matching_loss(model: WorldModel, batch: dict, noise: dict, action_channels_used: int,
                       video_weight: float = 1.0, action_weight: float = 1.0) -> dict:
    """One teacher-forced pass. batch: video (B,n,C,z,h,w), actions (B,n,K,a), action_mask (B,n,K),
    start_state (B,n,s) the robot state each chunk's actions start from, task."""
    video, actions, step_mask = batch["video"], batch["actions"], batch["action_mask"]
    B, n = video.shape[:2]
    if n < 2:
        raise ValueError("a training window needs at least 2 chunks: its first is context only")
    cfg = getattr(model, "module", model).cfg  # unwrap DDP
    A = cfg.action_channels
    actions = pad_channels(actions, A, "action")  # padding channels: zero and out of the loss
    dev = video.device
    nz = {k: v.to(dev) for k, v in noise.items()}
    t_v, t_a = nz["t_video"], nz["t_action"]
    channel = torch.zeros(A, device=dev)
    channel[:action_channels_used] = 1
    # Padding channels carry no noise either: at run time the sampler holds them at 0 (FlowSampler).
    eps_action = nz["eps_action"] * channel

    noisy_v = noised(video, nz["eps_video"], t_v)
    noisy_a = noised(actions, eps_action, t_a)
    # Noisy-history augmentation: the clean video history re-noised to a level in [0, 0.5] per sample,
    # or higher per chunk (`chunk_history`), told to the model.
    t_h = nz["history"][:, None].expand(B, n)
    if "chunk_history" in nz:
        t_h = torch.maximum(t_h, nz["chunk_history"])
    clean_v = noised(video, nz["eps_history"], t_h)
    # History-action dropout: the clean copy later chunks attend to, zeroed per chunk; targets unchanged.
    clean_a = actions * nz["action_history_keep"][..., None, None] if "action_history_keep" in nz else actions

    state = pad_channels(batch["start_state"], cfg.state_channels, "state") if cfg.state_channels else None
    observed = start_latents(video) if cfg.keypoints else None
    args = (noisy_v, clean_v, noisy_a, clean_a, t_v, t_a, t_h, batch["task"], state, observed)
    imagined = None
    if "imagined_future" in nz:
        imagined = imagine_futures(model, args, nz)
    pred_v, pred_a = model(*args, imagined=imagined)
    # The first chunk of a window is context only: its noisy video attends to no clean block (a window
    # starting mid-episode would predict a frame from the task text alone; at run time chunk 0 is always
    # the real first observation), and mid-episode its actions would be decoded without the frame they
    # start from. So neither is a target; every later chunk has its full window of history.
    # The bidirectional ablation trains the window's last chunk only: an earlier one's history would
    # have seen its future through the two-way clean attention (`attention_mask`).
    first = n - 1 if cfg.attention == "bidirectional" else 1
    loss_v = F.mse_loss(pred_v[:, first:], (nz["eps_video"] - video)[:, first:])
    step_mask = torch.cat([torch.zeros_like(step_mask[:, :first]), step_mask[:, first:]], dim=1)
    weight = step_mask.float()[..., None] * channel
    # Divided by every (sample, step, used channel) slot of the target chunks, not by the unmasked count:
    # the mean then splits exactly over micro-batches and processes (gradient accumulation and DDP equal
    # one big batch), and the action/video balance does not move with the window's length.
    slots = step_mask[:, first:].numel() * max(1, action_channels_used)
    loss_a = ((pred_a - (eps_action - actions)) ** 2 * weight).sum() / slots
    if not cfg.video_prediction:  # the ablation: nothing imagines video; the action loss alone trains
        video_weight = 0.0
    loss = video_weight * loss_v + action_weight * loss_a
    return {"loss": loss, "video": loss_v.detach(), "action": loss_a.detach()}
