"""Training: it learns, resumes exactly, and 2 DDP processes equal 1 on the same global batch."""

import dataclasses
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from lingbot.config import TrainConfig, preset
from lingbot.train.loop import train

CFG = TrainConfig(steps=6, batch_size=4, lr=3e-3, warmup=2, checkpoint_every=3, min_chunks=2, max_chunks=3)


def _weights(run):
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def test_exact_resume(latent_cache, tmp_path):
    model = preset("tiny").model
    once = train(CFG, model, latent_cache, tmp_path / "once", progress=False)
    train(CFG, model, latent_cache, tmp_path / "split", stop_after=3, progress=False)
    resumed = train(CFG, model, latent_cache, tmp_path / "split", progress=False)
    assert once["steps"] == resumed["steps"] == CFG.steps
    a, b = _weights(tmp_path / "once"), _weights(tmp_path / "split")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ema_a = load_file(str(tmp_path / "once" / "checkpoint" / "ema.safetensors"))
    ema_b = load_file(str(tmp_path / "split" / "checkpoint" / "ema.safetensors"))
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) <= 1e-6
    log = (tmp_path / "split" / "log.tsv").read_text().splitlines()
    assert len(log) == CFG.steps + 1


def test_gradient_accumulation_matches_one_big_batch(latent_cache, tmp_path):
    model = preset("tiny").model
    train(CFG, model, latent_cache, tmp_path / "big", progress=False)
    train(dataclasses.replace(CFG, grad_accum=2), model, latent_cache, tmp_path / "acc", progress=False)
    a, b = _weights(tmp_path / "big"), _weights(tmp_path / "acc")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4


def test_finetune_starts_from_pretrain_and_learns(latent_cache, tmp_path):
    model = preset("tiny").model
    cfg = dataclasses.replace(CFG, steps=40, checkpoint_every=40)
    pre = train(cfg, model, latent_cache, tmp_path / "pre", progress=False)
    first = [float(l.split("\t")[1]) for l in (tmp_path / "pre" / "log.tsv").read_text().splitlines()[1:6]]
    assert pre["final_loss"] < sum(first) / len(first)
    fine = dataclasses.replace(cfg, steps=2, tasks=("open the drawer",), max_episodes_per_task=1)
    report = train(fine, model, latent_cache, tmp_path / "fine", init_from=tmp_path / "pre" / "checkpoint",
                   progress=False)
    assert report["episodes"] == 1


def test_two_ddp_processes_equal_one(latent_cache, tmp_path, tiny_config):
    model = preset("tiny").model
    cfg = dataclasses.replace(CFG, steps=3, checkpoint_every=3)
    train(cfg, model, latent_cache, tmp_path / "single", progress=False)
    params = tmp_path / "params.yaml"
    params.write_text("preset: tiny\npretrain:\n  steps: 3\n  batch_size: 4\n  lr: 0.003\n  warmup: 2\n"
                      "  checkpoint_every: 3\n  min_chunks: 2\n  max_chunks: 3\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "lingbot.cli", "pretrain", str(latent_cache), "--params", str(params),
                    "--out", str(tmp_path / "ddp"), "--quiet"], check=True, env=env, capture_output=True)
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    # Equal up to the summation order of gloo's all-reduce, which Adam's normalisation amplifies a little:
    # the gap must be tiny next to how far the weights moved in those 3 steps.
    from lingbot.data.latents import LatentWindows
    from lingbot.model.world_model import WorldModel

    manifest = LatentWindows(latent_cache).manifest
    torch.manual_seed(cfg.seed)
    init = WorldModel(dataclasses.replace(model, latent_channels=manifest["z_dim"]),
                      cameras=len(manifest["cameras"]), actions_per_chunk=4).state_dict()
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3 and gap <= 5e-5 and gap < moved / 100, (gap, moved)


def test_activation_checkpointing_gives_the_same_gradients(latent_cache):
    from lingbot.data.latents import LatentWindows
    from lingbot.model.world_model import WorldModel, draw_noise, flow_matching_loss
    from lingbot.train.loop import StepSampler, apply_activation_checkpointing, select_episodes

    data = LatentWindows(latent_cache)
    batch = StepSampler(data, CFG, select_episodes(data.manifest, CFG)).batch(0)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = WorldModel(dataclasses.replace(preset("tiny").model, latent_channels=data.manifest["z_dim"]),
                           cameras=len(data.manifest["cameras"]))
        if checkpointing:
            apply_activation_checkpointing(model)
        noise = draw_noise(batch, model.cfg.action_channels, 3.0, 0.5, torch.Generator().manual_seed(0))
        flow_matching_loss(model, batch, noise, 4)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
