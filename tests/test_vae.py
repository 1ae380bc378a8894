"""The causal VAE: streaming equals batch, the pretrained (diffusers layout) path, and fit_vae's outputs."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lingbot.config import VAEConfig
from lingbot.vae.fit import fit_vae
from lingbot.vae.wan import StreamingEncoder, build_vae, encode_clip, load_vae, to_pixels


def wan22_style_vae():
    """A miniature of Wan2.2's VAE layout: 2x2 patchify (12 channels in/out), residual blocks."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=8, decoder_base_dim=12, z_dim=6, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], in_channels=12, out_channels=12, patch_size=2,
        is_residual=True, scale_factor_spatial=16, latents_mean=[0.0] * 6, latents_std=[1.0] * 6,
    ).eval()


def wan21_style_vae():
    """Wan2.1's layout built from our config: full-resolution input, plain blocks, 8x spatial."""
    return build_vae(VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 4, 4), patch_size=1, residual=False)).eval()


@pytest.mark.parametrize("make", [lambda: build_vae(VAEConfig(base_dim=8, z_dim=4)).eval(), wan22_style_vae,
                                  wan21_style_vae], ids=["small", "wan22-style", "wan21-style"])
def test_streaming_encode_equals_whole_clip(make):
    vae = make()
    torch.manual_seed(1)
    clip = torch.rand(2, 3, 13, 32, 32) * 2 - 1
    whole = encode_clip(vae, clip)
    stream = StreamingEncoder(vae)
    outputs = [stream.push(clip[:, :, t]) for t in range(13)]
    # A latent comes out after frame 1, then after every 4th frame.
    assert [t for t, o in enumerate(outputs) if o is not None] == [0, 4, 8, 12]
    streamed = torch.stack([o for o in outputs if o is not None], dim=2)
    assert streamed.shape == whole.shape
    assert (streamed - whole).abs().max().item() <= 1e-4
    stream.reset()  # a reset encoder starts a new clip: the first frame alone again
    assert stream.push(clip[:, :, 0]) is not None


def test_small_vae_is_8x_spatial_4x_temporal_and_bad_layouts_are_refused():
    vae = build_vae(VAEConfig(base_dim=8, z_dim=4)).eval()
    z = encode_clip(vae, torch.zeros(1, 3, 9, 64, 64))
    assert z.shape == (1, 4, 3, 8, 8) and vae.config.scale_factor_spatial == 8
    from lingbot.errors import LingbotError

    with pytest.raises(LingbotError, match="last two levels equal"):
        build_vae(VAEConfig(dim_mult=(1, 2, 4)))
    with pytest.raises(LingbotError, match="needs >= 3 levels"):
        build_vae(VAEConfig(dim_mult=(1, 2)))


def test_pretrained_vae_loads_from_a_diffusers_directory(ingested, tmp_path, tiny_config):
    repo = tmp_path / "wan-mini"
    wan22_style_vae().save_pretrained(repo / "vae")
    cfg = dataclasses.replace(tiny_config.vae, pretrained=str(repo), subfolder="vae")
    report = fit_vae(cfg, ingested, tmp_path / "vae", progress=False)
    assert report["steps"] == 0 and report["z_dim"] == 6
    loaded = load_vae(tmp_path / "vae")
    assert loaded.config.patch_size == 2 and len(loaded.config.latents_mean) == 6
    with pytest.raises(Exception, match="cannot load the VAE"):
        load_vae(tmp_path / "nowhere-vae")


def test_fit_vae_trains_scores_and_normalises(ingested, tmp_path, tiny_config):
    cfg = tiny_config.vae
    report = fit_vae(cfg, ingested, tmp_path / "vae", grid_png=tmp_path / "grid.png",
                     log_tsv=tmp_path / "train.tsv", progress=False)
    assert report["steps"] == cfg.steps
    assert 0 < report["psnr_db"] < 60 and -1 <= report["ssim"] <= 1
    lines = (tmp_path / "train.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["step", "loss", "psnr", "lr"] and len(lines) == cfg.steps + 1
    grid = Image.open(tmp_path / "grid.png")
    size = tiny_config.collect.image_size
    assert grid.size == (8 * size * 2, 2 * size * 2)
    # Latent normalisation is stored with the weights, in the VAE's own config.
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert len(config["latents_mean"]) == cfg.z_dim and all(s > 0 for s in config["latents_std"])
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    # Normalised latents of the training clips are ~zero-mean, unit-std per channel.
    from lingbot.vae.fit import load_frames, read_demos

    manifest, split, layout = read_demos(ingested)
    vae = load_vae(tmp_path / "vae")
    clips = load_frames(layout, manifest["keys"]["cameras"], split["train"])
    z = torch.cat([encode_clip(vae, to_pixels(c[: 1 + 4 * ((len(c) - 1) // 4)]))[0].flatten(1) for c in clips], 1)
    np.testing.assert_allclose(z.mean(1).numpy(), 0, atol=1e-3)
    np.testing.assert_allclose(z.std(1).numpy(), 1, atol=2e-2)


def test_gradient_loss_is_zero_only_for_the_same_edges():
    import torch.nn.functional as F

    from lingbot.vae.fit import gradient_loss

    x = -torch.ones(1, 3, 1, 16, 16)
    x[..., 7:9, 7:9] = 1.0  # a 2x2 marker
    blurred = F.avg_pool3d(F.pad(x, (2, 2, 2, 2, 0, 0), mode="replicate"), (1, 5, 5), stride=1)
    assert gradient_loss(x, x).item() == 0.0
    assert gradient_loss(blurred, x).item() > 0.01
    shifted = torch.roll(x, 1, dims=-1)  # the marker one pixel off: same pixel statistics
    assert gradient_loss(shifted, x).item() > 0.0


def test_foreground_weights_single_out_what_moves_over_the_static_background():
    """`vae.foreground_weight`: the background is the per-pixel median of a camera's frames; pixels that
    differ from it (a small object that moves between episodes) weigh 1 + w, the rest 1."""
    from lingbot.vae.fit import foreground_weights, static_background

    rng = np.random.default_rng(0)
    table = rng.integers(60, 120, size=(16, 16, 3), dtype=np.uint8)  # textured, but the same in every frame
    clips = []
    for ep in range(5):
        clip = np.repeat(table[None], 6, axis=0)
        clip[:, 2 * ep : 2 * ep + 2, 3:5] = (200, 10, 10)  # a 2x2 puck, somewhere else in each episode
        clips.append(clip)
    background = static_background(clips, frames=30)
    np.testing.assert_array_equal(background, table)
    x = to_pixels(clips[1])  # (1, 3, T, H, W)
    w = foreground_weights(x, to_pixels(background[None])[:, :, 0], 9.0)
    assert w.shape == (1, 1, 6, 16, 16)
    assert torch.all(w[..., 2:4, 3:5] == 10.0)
    assert torch.all(w[..., :2, :] == 1.0) and torch.all(w[..., 4:, :] == 1.0)


def test_fit_vae_with_foreground_weight_trains(ingested, tmp_path, tiny_config):
    import dataclasses

    cfg = dataclasses.replace(tiny_config.vae, foreground_weight=4.0)
    report = fit_vae(cfg, ingested, tmp_path / "vae", progress=False)
    assert report["steps"] == cfg.steps and 0 < report["psnr_db"] < 60


def test_the_kl_weight_changes_the_loss_by_what_it_says():
    """vae.kl_weight weighs the mean KL per latent element: the closed form of a known posterior, and
    one step's loss moves by exactly weight x KL (the reconstruction term is the same draw)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from lingbot.vae.fit import kl_per_element, train

    mean, logvar = torch.full((1, 4, 2, 3, 3), 0.5), torch.full((1, 4, 2, 3, 3), -1.0)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1))
    expected = 0.5 * (0.25 + np.exp(-1.0) - 1.0 + 1.0)
    assert kl_per_element(posterior).item() == pytest.approx(expected, rel=1e-5)

    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (9, 16, 16, 3), dtype=np.uint8) for _ in range(2)]
    logs = {}
    for weight in (0.0, 0.1):
        cfg = VAEConfig(base_dim=8, z_dim=4, clip_frames=5, steps=1, batch_size=1, kl_weight=weight)
        logs[weight] = train(build_vae(cfg), clips, cfg, progress=False)[0]
    assert logs[0.0]["kl"] == pytest.approx(logs[0.1]["kl"], rel=1e-6) and logs[0.0]["kl"] > 0.01
    assert logs[0.1]["loss"] - logs[0.0]["loss"] == pytest.approx(0.1 * logs[0.0]["kl"], rel=1e-4)


def test_the_latent_statistics_sample_is_spread_and_bounded():
    import numpy as np

    from lingbot.vae.fit import STATS_CLIPS, STATS_FRAMES, stats_sample

    def clips(n, frames):
        return [np.full((frames, 1, 1, 3), i, np.int32) for i in range(n)]

    short = clips(360, 156)  # MetaWorld's default: 180 episodes x 2 cameras, at most 156 frames
    assert [int(c[0, 0, 0, 0]) for c in stats_sample(short)] == list(range(0, 360, 360 // STATS_CLIPS))
    long = stats_sample(clips(90, 400))  # ALOHA: 90 episodes of 400 frames
    assert [int(c[0, 0, 0, 0]) for c in long] == list(range(0, 90, 8))
    assert sum(len(c) for c in long) <= STATS_FRAMES
    assert len(stats_sample(clips(1, 20000))) == 1


@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="the stall is in oneDNN's AMX kernel")
def test_a_bf16_step_that_stalls_on_this_cpu_trains_in_fp32(caplog):
    """On a CPU with AMX, the small VAE's bf16 weight gradient at 128x128 never finishes with 2 threads
    (oneDNN's brgconv_bwd_w): fit_vae's probe sees it and trains in fp32, saying why; 64x64 frames keep
    bf16 without a probe, 96x128 ones (probed) too."""
    from lingbot.config import preset
    from lingbot.vae.fit import bf16_step_stalls, cpu_precision

    cfg, cpu = preset("small").vae, torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with caplog.at_level("WARNING", logger="lingbot.vae"):
            assert cpu_precision(cfg, "bf16", cpu, (128, 128), timeout_s=10.0) == "fp32"
        assert "did not finish" in caplog.text and "128x128" in caplog.text
        assert cpu_precision(cfg, "bf16", cpu, (64, 64)) == "bf16"
        assert not bf16_step_stalls(cfg, (96, 128), 2)
        assert cpu_precision(cfg, "fp32", cpu, (128, 128)) == "fp32"
    finally:
        torch.set_num_threads(threads)


def test_the_teacher_is_efficientnet_lite0_with_its_imagenet_weights():
    """The network written in lingbot/vae/teacher.py, loaded with the package's weights, puts a photograph
    of a cat in ImageNet's cat classes (281-285: tabby, tiger, Persian, Siamese, Egyptian cat): a wrong
    stride, padding, activation or block order would not."""
    from pathlib import Path

    from lingbot.vae.teacher import load_teacher

    image = np.asarray(Image.open(Path(__file__).parent / "data" / "chelsea-96.png").convert("RGB"))
    x = (torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() - 127) / 128
    with torch.no_grad():
        p = load_teacher()(x).softmax(-1)[0]
    assert int(p.argmax()) in range(281, 286) and float(p[281:286].sum()) > 0.8


def test_the_alignment_loss_is_zero_for_latents_that_carry_the_features_of_their_frames():
    """Latents equal to the teacher's features of the frames each latent frame encodes (first frame
    alone, then groups of 4), through an identity projection: no loss. The same latents a frame off in
    time, or random ones, are penalised."""
    from lingbot.vae.teacher import FEATURE_CHANNELS, alignment_loss, group_frames, teacher_features

    torch.manual_seed(0)
    frames = torch.rand(1, 3, 9, 32, 32) * 2 - 1  # three latent frames of different content:
    frames[:, :, 1:5] = torch.linspace(-1, 1, 32)  # noise, a ramp, a checkerboard of 8x8 squares
    frames[:, :, 5:] = ((torch.arange(32) // 8)[:, None] + (torch.arange(32) // 8)[None, :]) % 2 * 2.0 - 1
    t, (h, w) = 3, (2, 2)
    grouped = group_frames(frames, t)
    assert torch.allclose(grouped[:, :, 1], frames[:, :, 1:5].mean(dim=2))
    feats = teacher_features(grouped.transpose(1, 2).flatten(0, 1), (h, w))  # (t, D, h, w)
    latents = feats.unflatten(0, (1, t)).transpose(1, 2)  # (1, D, t, h, w)
    identity = torch.nn.Conv2d(FEATURE_CHANNELS, FEATURE_CHANNELS, 1, bias=False)
    identity.weight.data = torch.eye(FEATURE_CHANNELS)[:, :, None, None]
    assert alignment_loss(latents, identity, frames).item() == pytest.approx(0.0, abs=1e-6)
    shifted = latents[:, :, [0, 2, 1]]
    assert alignment_loss(shifted, identity, frames).item() > 0.01
    assert alignment_loss(torch.randn_like(latents), identity, frames).item() > 0.1


def test_fit_vae_with_the_alignment_trains_the_encoder_toward_the_features():
    """vae.align_weight adds the alignment to the loss (logged), and over a few steps on the same clip it
    falls: the encoder and the projection learn from it."""
    from lingbot.vae.fit import train

    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)]
    cfg = VAEConfig(base_dim=8, z_dim=4, clip_frames=5, steps=30, batch_size=1, lr=5e-3, align_weight=1.0)
    log = train(build_vae(cfg), clips, cfg, progress=False)
    assert all("align" in e for e in log)
    assert np.mean([e["align"] for e in log[-5:]]) < 0.8 * np.mean([e["align"] for e in log[:5]])
