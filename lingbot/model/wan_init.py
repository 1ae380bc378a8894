"""Start the world model from a pretrained video model: diffusers' WanTransformer3DModel.

The video expert takes Wan's weights one to one (its layer layout was chosen so: AdaLN table, RMS-normed
q/k, cross-attention to projected text, tanh-GELU FFN, modulated output norm). The action expert,
which Wan lacks, is initialised as the paper does: every video-expert weight interpolated to the
action widths, and weights whose fan-in shrank scaled by sqrt(fan_in_video / fan_in_action) so the
activations keep their scale. New pieces (action in/out, camera embeddings) keep their own init.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lingbot.errors import LingbotError


def _resize(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Linearly interpolate every axis of `t` whose size differs from `shape`."""
    out = t.float()
    for axis, size in enumerate(shape):
        if out.shape[axis] == size:
            continue
        moved = out.movedim(axis, -1)
        flat = moved.reshape(-1, 1, moved.shape[-1])
        flat = F.interpolate(flat, size=size, mode="linear", align_corners=True)
        out = flat.reshape(*moved.shape[:-1], size).movedim(-1, axis)
    return out.to(t.dtype)


def _shrink(source: torch.Tensor, target: torch.Tensor, chunks: int = 1) -> torch.Tensor:
    """`source` resized to `target`'s shape; `chunks` > 1 keeps the 6 AdaLN groups of axis 0 apart."""
    if chunks > 1:
        src = source.unflatten(0, (chunks, -1))
        dst_shape = (chunks, target.shape[0] // chunks, *target.shape[1:])
        out = _resize(src, dst_shape).flatten(0, 1)
    else:
        out = _resize(source, tuple(target.shape))
    if source.ndim == 2 and source.shape[1] != target.shape[1]:
        out = out * (source.shape[1] / target.shape[1]) ** 0.5
    return out


def wan_to_video_expert(wan: dict[str, torch.Tensor], depth: int, latent_channels: int,
                        patch: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Map a WanTransformer3DModel state dict onto WorldModel's video-expert names."""
    ph, pw = patch
    dim = wan["patch_embedding.weight"].shape[0]
    out = {
        "video_in.weight": wan["patch_embedding.weight"].reshape(dim, -1),  # (c, ph, pw) order, as patchify
        "video_in.bias": wan["patch_embedding.bias"],
        "time_embed_v.0.weight": wan["condition_embedder.time_embedder.linear_1.weight"],
        "time_embed_v.0.bias": wan["condition_embedder.time_embedder.linear_1.bias"],
        "time_embed_v.2.weight": wan["condition_embedder.time_embedder.linear_2.weight"],
        "time_embed_v.2.bias": wan["condition_embedder.time_embedder.linear_2.bias"],
        "time_proj_v.1.weight": wan["condition_embedder.time_proj.weight"],
        "time_proj_v.1.bias": wan["condition_embedder.time_proj.bias"],
        "text_in.0.weight": wan["condition_embedder.text_embedder.linear_1.weight"],
        "text_in.0.bias": wan["condition_embedder.text_embedder.linear_1.bias"],
        "text_in.2.weight": wan["condition_embedder.text_embedder.linear_2.weight"],
        "text_in.2.bias": wan["condition_embedder.text_embedder.linear_2.bias"],
        "out_modulation_v": wan["scale_shift_table"],
    }
    # Wan's proj_out rows are ordered (ph, pw, c); our video_out rows (c, ph, pw), as patchify.
    c = latent_channels
    order = torch.tensor([(i * pw + j) * c + ch for ch in range(c) for i in range(ph) for j in range(pw)])
    out["video_out.weight"] = wan["proj_out.weight"][order]
    out["video_out.bias"] = wan["proj_out.bias"][order]
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"layers.{i}.video."
        out[dst + "modulation"] = wan[src + "scale_shift_table"]
        for attn, prefix in (("attn1.", ""), ("attn2.", "cross.")):
            for name in ("to_q", "to_k", "to_v"):
                out[f"{dst}{prefix}{name}.weight"] = wan[f"{src}{attn}{name}.weight"]
                out[f"{dst}{prefix}{name}.bias"] = wan[f"{src}{attn}{name}.bias"]
            out[f"{dst}{prefix}to_out.weight"] = wan[f"{src}{attn}to_out.0.weight"]
            out[f"{dst}{prefix}to_out.bias"] = wan[f"{src}{attn}to_out.0.bias"]
            out[f"{dst}{prefix}norm_q.weight"] = wan[f"{src}{attn}norm_q.weight"]
            out[f"{dst}{prefix}norm_k.weight"] = wan[f"{src}{attn}norm_k.weight"]
        out[dst + "norm_cross.weight"] = wan[src + "norm2.weight"]
        out[dst + "norm_cross.bias"] = wan[src + "norm2.bias"]
        out[dst + "ffn.0.weight"] = wan[src + "ffn.net.0.proj.weight"]
        out[dst + "ffn.0.bias"] = wan[src + "ffn.net.0.proj.bias"]
        out[dst + "ffn.2.weight"] = wan[src + "ffn.net.2.weight"]
        out[dst + "ffn.2.bias"] = wan[src + "ffn.net.2.bias"]
    return out


def action_expert_from_video(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Interpolate the (already loaded) video-expert weights into the action expert's shapes."""
    target = model.state_dict()
    out = {}
    for name, tensor in target.items():
        if ".action." in name and ".cross." not in name:
            source = state[name.replace(".action.", ".video.")]
        elif name.startswith(("time_embed_a", "time_proj_a", "out_modulation_a")):
            source = state[name.replace("_a", "_v", 1)]
        else:
            continue
        chunks = 6 if name.startswith("time_proj_a") else 1
        out[name] = _shrink(source, tensor, chunks)
    return out


def init_from_wan(model, source: str | Path) -> dict[str, int]:
    """Load a WanTransformer3DModel (local dir or Hub id) into `model`; returns counts of what was set."""
    from diffusers import WanTransformer3DModel

    cfg = model.cfg
    try:
        wan = WanTransformer3DModel.from_pretrained(str(source), use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise LingbotError(f"{source}: cannot load a Wan transformer ({str(exc).splitlines()[0]})") from None
    wc = wan.config
    checks = {
        "video_width": (cfg.video_width, wc.num_attention_heads * wc.attention_head_dim),
        "heads": (cfg.heads, wc.num_attention_heads),
        "head_dim": (cfg.head_dim, wc.attention_head_dim),
        "depth": (cfg.depth, wc.num_layers),
        "video_ffn": (cfg.video_ffn, wc.ffn_dim),
        "latent_channels": (cfg.latent_channels, wc.in_channels),
        "text_dim": (cfg.text_dim, wc.text_dim),
        "freq_dim": (cfg.freq_dim, wc.freq_dim),
        "patch": (tuple(cfg.patch), tuple(wc.patch_size[1:])),
    }
    for field, (ours, theirs) in checks.items():
        if ours != theirs:
            raise LingbotError(f"{source}: Wan {field} is {theirs}, the model config has {ours}")
    video = wan_to_video_expert(wan.state_dict(), cfg.depth, cfg.latent_channels, tuple(cfg.patch))
    model.load_state_dict(video, strict=False)
    action = action_expert_from_video(model.state_dict(), model)
    model.load_state_dict(action, strict=False)
    return {"video_tensors": len(video), "action_tensors": len(action)}
