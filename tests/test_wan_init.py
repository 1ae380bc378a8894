"""Initialising from a pretrained Wan transformer: the video expert reproduces Wan, the action expert is
Wan interpolated to its widths."""

import dataclasses

import pytest
import torch

from lingbot.config import ModelConfig
from lingbot.errors import LingbotError
from lingbot.model.wan_init import init_from_wan
from lingbot.model.world_model import WorldModel

CFG = ModelConfig(video_width=24, action_width=12, depth=2, heads=2, head_dim=12, video_ffn=48, action_ffn=24,
                  latent_channels=4, text_dim=16, freq_dim=32, action_channels=4)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=48,
                                num_layers=2, cross_attn_norm=True, rope_max_seq_len=64)
    with torch.no_grad():  # Wan zero-inits nothing we could miss, but make the tables non-trivial
        for name, p in wan.named_parameters():
            if "scale_shift_table" in name:
                p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("wan") / "transformer"
    wan.save_pretrained(path)
    return path


def test_video_expert_reproduces_wan_on_a_first_frame(wan_dir):
    from diffusers import WanTransformer3DModel

    wan = WanTransformer3DModel.from_pretrained(wan_dir).eval()
    model = WorldModel(CFG, cameras=1, actions_per_chunk=4).eval()
    counts = init_from_wan(model, wan_dir)
    assert counts["video_tensors"] > 30 and counts["action_tensors"] > 20
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 1, 8, 8, generator=g)  # (B, z, F=1, h, w)
    text = torch.randn(2, 5, 16, generator=g)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        expected = wan(latents, t * 1000, text, return_dict=False)[0]  # (B, z, 1, h, w)
        video = latents.permute(0, 2, 1, 3, 4).unsqueeze(2)  # (B, n=1, C=1, z, h, w)
        actions = torch.zeros(2, 1, 4, 4)
        ours, _ = model(video, torch.zeros_like(video), actions, actions, t[:, None], t[:, None],
                        torch.zeros(2, 1), text, torch.zeros(2, 1, model.cfg.state_channels))
    # One chunk: noisy video sees only itself, exactly Wan's full self-attention over the frame.
    torch.testing.assert_close(ours[:, 0, 0], expected[:, :, 0], atol=1e-4, rtol=1e-4)


def test_action_expert_is_the_video_expert_interpolated(wan_dir):
    model = WorldModel(CFG, cameras=1, actions_per_chunk=4)
    init_from_wan(model, wan_dir)
    state = model.state_dict()
    video_q, action_q = state["layers.0.video.to_q.weight"], state["layers.0.action.to_q.weight"]
    assert action_q.shape == (24, 12)
    # Fan-in 24 -> 12, endpoints of the interpolation kept, scaled by sqrt(24 / 12).
    torch.testing.assert_close(action_q[:, 0], video_q[:, 0] * 2**0.5)
    torch.testing.assert_close(action_q[:, -1], video_q[:, -1] * 2**0.5)
    out = state["layers.1.action.to_out.weight"]  # fan-out shrinks: no scaling
    torch.testing.assert_close(out[0], state["layers.1.video.to_out.weight"][0])
    proj_v, proj_a = state["time_proj_v.1.bias"].view(6, 24), state["time_proj_a.1.bias"].view(6, 12)
    torch.testing.assert_close(proj_a[:, 0], proj_v[:, 0])  # the six AdaLN groups stay apart
    torch.testing.assert_close(proj_a[:, -1], proj_v[:, -1])


def test_mismatched_config_is_refused(wan_dir):
    model = WorldModel(dataclasses.replace(CFG, depth=3), cameras=1)
    with pytest.raises(LingbotError, match="Wan depth is 2, the model config has 3"):
        init_from_wan(model, wan_dir)
