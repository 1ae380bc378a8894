"""Every tensor on the model's device: the forward and loss, a training step, the KV-cache step and a policy
chunk run on PyTorch's `meta` device, which, like a GPU, refuses any op that mixes in a CPU tensor (a
0-d CPU scalar aside). A CPU run cannot see a tensor made on the wrong device; these tests can, without
a GPU. Also: the precision each stage resolves on a CPU with and without native bf16, and its record."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lingbot.config import PolicyConfig, preset
from lingbot.model.world_model import KVCache, WorldModel, draw_noise, flow_matching_loss

META = torch.device("meta")
B, N, C, Z, H, W, K = 2, 3, 2, 4, 4, 4, 4


def _model(device, keypoints=0):
    torch.manual_seed(0)
    with torch.device(device):
        return WorldModel(dataclasses.replace(preset("tiny").model, keypoints=keypoints), cameras=C, actions_per_chunk=K)


def _batch(device):
    g = torch.Generator().manual_seed(0)
    batch = {"video": torch.randn(B, N, C, Z, H, W, generator=g), "actions": torch.rand(B, N, K, 4, generator=g),
             "action_mask": torch.ones(B, N, K, dtype=torch.bool), "task": torch.randn(B, 1, 384, generator=g),
             "start_state": torch.rand(B, N, 4, generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


@pytest.mark.parametrize("keypoints, imagined", [(0, 0.0), (8, 0.0), (0, 1.0)])
def test_forward_and_loss_keep_every_tensor_on_the_device(keypoints, imagined):
    model, batch = _model(META, keypoints), _batch(META)
    noise = draw_noise(batch, model.cfg.action_channels, 3.0, 0.5, torch.Generator().manual_seed(0), 0.5,
                       imagined_future_p=imagined)
    losses = flow_matching_loss(model, batch, noise, 4)
    assert losses["loss"].device == META and losses["loss"].shape == ()
    losses["loss"].backward()
    assert all(p.grad is not None and p.grad.device == META for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_training_step_of_the_loop_runs_on_the_device(latent_cache, checkpointing):
    """The loop's step as `train` takes it: this process's rows of the sampler's batch moved to the device,
    the global batch's noise sliced, forward, backward, clipping, AdamW and the EMA."""
    from lingbot.data.latents import LatentWindows
    from lingbot.train.loop import (StepSampler, apply_activation_checkpointing, make_optimizer, rank_rows,
                                    select_episodes, train_step)

    cfg = dataclasses.replace(preset("tiny").pretrain, batch_size=4, grad_accum=2, max_chunks=3)
    data = LatentWindows(latent_cache)
    sampler = StepSampler(data, cfg, select_episodes(data.manifest, cfg))
    model_cfg = dataclasses.replace(preset("tiny").model, latent_channels=data.manifest["z_dim"])
    with torch.device(META):
        model = WorldModel(model_cfg, cameras=len(data.manifest["cameras"]))
    if checkpointing:
        apply_activation_checkpointing(model)
    optimizer = make_optimizer(model, cfg)
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = rank_rows(1, 2, cfg.batch_size)
    batch = sampler.batch(0, rows=rows)
    noise = draw_noise(batch, model_cfg.action_channels, cfg.shift, cfg.history_noise_p,
                       torch.Generator().manual_seed(0), batch_size=cfg.batch_size)
    part = {k: v.to(META) for k, v in batch.items() if torch.is_tensor(v)}
    total = train_step(model, model, optimizer, ema, part, {k: v[rows] for k, v in noise.items()}, cfg,
                       len(data.manifest["stats"]["action"]["q01"]), "fp32", sync_last_only=False)
    assert {k: (v.device, v.shape) for k, v in total.items()} == {k: (META, ()) for k in
                                                                  ("loss", "video", "action", "grad_norm")}
    assert optimizer.state and all(s["exp_avg"].device == META for s in optimizer.state.values())


@pytest.mark.parametrize("keypoints", [0, 8])
def test_incremental_step_with_the_kv_cache_stays_on_the_device(keypoints):
    from lingbot.policy.denoise import chunk_noise, denoise_chunk, write_history

    model = _model(META, keypoints).eval()
    g = torch.Generator().manual_seed(0)
    text = model.encode_text(torch.randn(1, 1, 384, generator=g).to(META))
    cache = KVCache(model.cfg.depth)
    cfg = PolicyConfig(video_steps=2, video_exec_step=1, action_steps=2, history_chunks=2, imagined_noise=0.0)
    with torch.no_grad():
        for k in range(3):  # past the ring window: eviction runs on the device's buffers too
            write_history(model, cache, k, text, torch.randn(1, C, Z, H, W, generator=g).to(META),
                          torch.zeros(1, K, 16, device=META), cfg.history_chunks, state=torch.zeros(1, 16, device=META))
            cache.evict_before(2 * (k + 1) - 2 * cfg.history_chunks + 1)
        x, a, r = chunk_noise(g, (C, Z, H, W), K, 16, META)
        actions, imagined = denoise_chunk(model, cache, 3, text, x, a, cfg, torch.zeros(1, 16, device=META),
                                          action_dim=4, renoise=r, observed=torch.zeros(1, C, Z, H, W, device=META))
    assert actions.device == imagined.device == META
    assert actions.shape == (K, 16) and imagined.shape == (1, C, Z, H, W)
    assert all(buf[0].device == META for buf in cache.buffers)


def test_a_policy_session_computes_a_chunk_on_the_device(tiny_bundle):
    """Bundle loading, the streaming VAE, grounding, imagining and decoding: one chunk of `Session`."""
    from lingbot.policy.runtime import load_policy

    policy = load_policy(tiny_bundle, device="meta", video_steps=2, video_exec_step=2, action_steps=2)
    session = policy.new_session()
    rng = np.random.default_rng(0)
    h, w = policy.meta["image_size"]
    obs = {**{key: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for key in policy.cameras},
           policy.state_key: np.zeros(policy.meta["state_dim"], np.float32)}
    first = session.compute_chunk(obs)
    for _ in range(policy.K - 1):
        session.observe(obs)
    second = session.compute_chunk(obs)  # grounds the first chunk's frames and actions, then imagines
    assert first.device == second.device == META and second.shape == (policy.K, policy.model.cfg.action_channels)
    assert session.chunk == 2 and all(x.device == META for x in session.real_latents + session.imagined_latents)


def test_step_masks_are_built_once_per_chunk_kind_and_reused():
    """A chunk's denoising steps reuse one mask and one set of RoPE angles (no host-to-device copy per step);
    in the ring's steady state the next chunk reuses the previous chunk's mask too."""
    from lingbot.model import world_model
    from lingbot.policy.denoise import chunk_noise, denoise_chunk, write_history

    model = _model("cpu").eval()
    built = []
    real_mask = world_model.attention_mask

    def counting(*args, **kwargs):
        built.append(1)
        return real_mask(*args, **kwargs)

    g = torch.Generator().manual_seed(0)
    cfg = PolicyConfig(video_steps=4, video_exec_step=4, action_steps=5, history_chunks=2)
    text = model.encode_text(torch.randn(1, 1, 384, generator=g))
    cache = KVCache(model.cfg.depth)
    world_model.attention_mask = counting
    try:
        per_chunk = []
        with torch.no_grad():
            for k in range(6):
                before = len(built)
                write_history(model, cache, k, text, torch.randn(1, C, Z, H, W, generator=g), torch.zeros(1, K, 16),
                              cfg.history_chunks, state=torch.zeros(1, 16))
                cache.evict_before(2 * (k + 1) - 2 * cfg.history_chunks + 1)
                x, a, _ = chunk_noise(g, (C, Z, H, W), K, 16, "cpu")
                size = len(cache)
                denoise_chunk(model, cache, k + 1, text, x, a, cfg, torch.zeros(1, 16), action_dim=4)
                cache.truncate(size)
                per_chunk.append(len(built) - before)
    finally:
        world_model.attention_mask = real_mask
    # 4 kinds of step per chunk (history, noisy video x4, imagined video, noisy actions x5): at most 4 masks,
    # and none once the ring is full.
    assert max(per_chunk) <= 4 and per_chunk[-1] == 0, per_chunk


# ----------------------------------------------------------------------------------------------------
# Precision from the hardware.


def _resolved(env: dict) -> dict:
    """What a fresh process on this machine resolves with `env` set (the ISA caps are read at start-up)."""
    code = ("import json; from lingbot.hardware import native_bf16, resolve_precision, run_record, cpu_isa;"
            "print(json.dumps({'isa': cpu_isa(), 'native': native_bf16('cpu')[0],"
            " 'vae': resolve_precision('auto', 'cpu', 'fit_vae'), 'forced': resolve_precision('bf16', 'cpu', 'x'),"
            " 'record': run_record('cpu', resolve_precision('auto', 'cpu', 'fit_vae'))}))")
    import os

    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    return {**json.loads(run.stdout.strip().splitlines()[-1]), "stderr": run.stderr}


def test_precision_is_fp32_on_a_cpu_without_native_bf16():
    """torch and oneDNN capped at AVX2, as on a CPU that has no AVX-512: auto is fp32, and forcing bf16 is
    honoured with one warning saying why it is slow."""
    out = _resolved({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert out["isa"] == "AVX2" and out["native"] is False
    assert out["vae"] == "fp32" and out["record"]["precision"] == "fp32" and out["record"]["cpu_isa"] == "AVX2"
    assert out["forced"] == "bf16" and "precision bf16 forced" in out["stderr"] and "AVX2" in out["stderr"]


def test_precision_follows_what_the_cpu_has():
    from lingbot.hardware import cpu_isa, native_bf16, resolve_precision

    native, reason = native_bf16("cpu")
    has = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native == (cpu_isa().startswith("AVX512") and has and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert resolve_precision("auto", "cpu", "fit_vae") == ("bf16" if native else "fp32") and reason
    assert resolve_precision("fp32", "cpu", "fit_vae") == "fp32"
    with pytest.raises(Exception, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        resolve_precision("fp16", "cpu", "fit_vae")


def test_a_stage_records_its_precision_and_machine_with_its_outputs(ingested, tmp_path):
    from lingbot.hardware import cpu_isa, resolve_precision
    from lingbot.vae.fit import fit_vae

    cfg = dataclasses.replace(preset("tiny").vae, steps=1)
    report = fit_vae(cfg, ingested, tmp_path / "vae", progress=False)
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())["_lingbot"]
    assert saved == report["machine"]
    assert saved["precision"] == resolve_precision("auto", "cpu", "fit_vae") and saved["cpu_isa"] == cpu_isa()
    assert saved["device"] == "cpu" and saved["torch"] == torch.__version__.split("+")[0]


def test_a_policy_in_bf16_weights_acts_like_the_fp32_one(tiny_bundle):
    """`load_policy(dtype="bf16")`, what `lingbot serve --dtype auto` serves on a GPU with bf16: the world
    model's weights in bf16, the steps under bf16 autocast, the actions close to the fp32 policy's."""
    from lingbot.policy.runtime import load_policy, policy_dtype

    assert policy_dtype("auto", "cpu") == "fp32" and policy_dtype("auto", "meta") == "fp32"
    chunks = {}
    for dtype in ("fp32", "bf16"):
        policy = load_policy(tiny_bundle, dtype=dtype, video_steps=2, video_exec_step=2, action_steps=3)
        assert {p.dtype for p in policy.model.parameters()} == {torch.float32 if dtype == "fp32" else torch.bfloat16}
        h, w = policy.meta["image_size"]
        obs = {**{key: np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8) for key in policy.cameras},
               policy.state_key: np.zeros(policy.meta["state_dim"], np.float32)}
        session = policy.new_session(seed=0)
        chunks[dtype] = [session.infer(obs) for _ in range(2)]
    for a, b in zip(chunks["fp32"], chunks["bf16"]):
        assert a.dtype == b.dtype == np.float32 and np.abs(a - b).max() < 0.1 * (np.abs(a).max() + 1e-6) + 0.05
