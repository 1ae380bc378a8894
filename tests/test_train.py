"""Training: it learns, resumes exactly, and 2 DDP or FSDP processes equal 1 on the same global batch."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lingbot.config import TrainConfig, preset
from lingbot.errors import LingbotError
from lingbot.train.loop import train

CFG = TrainConfig(steps=6, batch_size=4, lr=3e-3, warmup=2, checkpoint_every=3, max_chunks=3)


def _weights(run, which="model"):
    return load_file(str(run / "checkpoint" / f"{which}.safetensors"))


def _torchrun(cfg: TrainConfig, cache, out, *args):
    """`lingbot pretrain` in 2 gloo processes under torchrun, on the tiny preset with `cfg`'s fields."""
    changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default}
    params = out.parent / f"{out.name}.params.yaml"
    params.write_text(yaml.safe_dump({"preset": "tiny", "pretrain": changed}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "lingbot.cli", "pretrain", str(cache), "--params", str(params), "--out", str(out),
                          "--quiet", *args], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def _assert_same_training(a_run, b_run, cache, which="model"):
    """Equal up to the summation order of gloo's reductions, which Adam's normalisation amplifies a
    little: the gap must be tiny next to how far the weights moved from their initialisation."""
    from lingbot.data.latents import LatentWindows
    from lingbot.model.world_model import WorldModel

    manifest = LatentWindows(cache).manifest
    torch.manual_seed(CFG.seed)
    init = WorldModel(dataclasses.replace(preset("tiny").model, latent_channels=manifest["z_dim"]),
                      cameras=len(manifest["cameras"]), actions_per_chunk=4).state_dict()
    a, b = _weights(a_run, which), _weights(b_run, which)
    assert a.keys() == b.keys()
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    # The EMA (decay 0.995) moves about a hundredth of what the weights move in a few steps.
    assert moved > (1e-3 if which == "model" else 1e-5) and gap <= 5e-5 and gap < moved / 100, (gap, moved)


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


def test_two_ddp_processes_equal_one(latent_cache, tmp_path):
    cfg = dataclasses.replace(CFG, steps=3, checkpoint_every=3)
    train(cfg, preset("tiny").model, latent_cache, tmp_path / "single", progress=False)
    _torchrun(cfg, latent_cache, tmp_path / "ddp")
    _assert_same_training(tmp_path / "single", tmp_path / "ddp", latent_cache)


# Constant schedule: a run told `--steps 2` takes the first 2 steps of the 4-step run exactly.
HALVES = dataclasses.replace(CFG, steps=4, checkpoint_every=2, schedule="constant")


@pytest.fixture(scope="module")
def fsdp_runs(latent_cache, tmp_path_factory):
    """HALVES in one process (`once`); its first half in one process and the second under 2-process FSDP
    (`plain-fsdp`), and the other way round (`fsdp-plain`); `half/plain`, `half/fsdp`: the runs after
    their first half."""
    root = tmp_path_factory.mktemp("fsdp")
    # The FSDP runs also recompute activations and accumulate 2 micro-batches, as large presets would.
    model = preset("tiny").model
    fsdp = dataclasses.replace(HALVES, parallel="fsdp", activation_checkpointing=True, grad_accum=2)
    train(HALVES, model, latent_cache, root / "once", progress=False)
    train(HALVES, model, latent_cache, root / "plain-fsdp", stop_after=2, progress=False)
    _torchrun(fsdp, latent_cache, root / "fsdp-plain", "--steps", "2")
    shutil.copytree(root / "plain-fsdp", root / "half" / "plain")
    shutil.copytree(root / "fsdp-plain", root / "half" / "fsdp")
    train(HALVES, model, latent_cache, root / "fsdp-plain", progress=False)
    _torchrun(fsdp, latent_cache, root / "plain-fsdp")
    return root


def test_two_fsdp_processes_equal_one_and_write_the_same_checkpoint(fsdp_runs, latent_cache):
    plain, fsdp = fsdp_runs / "half" / "plain", fsdp_runs / "half" / "fsdp"
    for which in ("model", "ema"):
        _assert_same_training(plain, fsdp, latent_cache, which)
    # One format: full tensors under the same names, the optimizer's numbered as one process numbers them.
    plain, fsdp = plain / "checkpoint", fsdp / "checkpoint"
    assert sorted(p.name for p in plain.iterdir()) == sorted(p.name for p in fsdp.iterdir())
    for name in ("model", "ema", "optimizer"):
        a, b = (load_file(str(d / f"{name}.safetensors")) for d in (plain, fsdp))
        assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    a, b = (load_file(str(d / "optimizer.safetensors")) for d in (plain, fsdp))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    a, b = (json.loads((d / "trainer.json").read_text()) for d in (plain, fsdp))
    assert a["param_groups"] == b["param_groups"] and a["slots"] == b["slots"] and a["step"] == b["step"] == 2


def test_fsdp_checkpoints_resume_in_one_process_and_back(fsdp_runs, latent_cache):
    """A FSDP checkpoint resumed by a plain process, and a plain one resumed under FSDP (set back into
    the shards), both end where the uninterrupted run ends."""
    for run in ("fsdp-plain", "plain-fsdp"):
        for which in ("model", "ema"):
            _assert_same_training(fsdp_runs / "once", fsdp_runs / run, latent_cache, which)
        assert len((fsdp_runs / run / "log.tsv").read_text().splitlines()) == HALVES.steps + 1


def test_unknown_parallel_is_refused(tmp_path):
    with pytest.raises(LingbotError, match="parallel must be one of ddp, fsdp, got 'fdsp'"):
        train(dataclasses.replace(CFG, parallel="fdsp"), preset("tiny").model, tmp_path / "cache", tmp_path / "out")


def test_imagined_futures_without_video_prediction_are_refused(tmp_path):
    model = dataclasses.replace(preset("tiny").model, video_prediction=False)
    with pytest.raises(LingbotError, match="imagined_future_p needs a model that imagines video"):
        train(dataclasses.replace(CFG, imagined_future_p=0.5), model, tmp_path / "cache", tmp_path / "out")


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


def test_fsdp_in_one_process_trains_unsharded_with_a_warning(latent_cache, tmp_path, caplog):
    report = train(dataclasses.replace(CFG, steps=1, parallel="fsdp"), preset("tiny").model, latent_cache, tmp_path,
                   progress=False)
    assert report["steps"] == 1 and report["world_size"] == 1
    assert "parallel fsdp in a single process trains unsharded" in caplog.text


def test_progress_in_a_log_file_is_whole_lines_with_loss_and_eta(latent_cache, tmp_path, capsys):
    """Not a terminal (stderr captured, as in `dvc repro > log`): one line per report, no redraws."""
    train(dataclasses.replace(CFG, steps=3), preset("tiny").model, latent_cache, tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train")]
    assert "\r" not in err and lines, err
    assert "3/3" in lines[-1] and "loss=" in lines[-1] and "<" in lines[-1]  # count, loss, elapsed<remaining
    assert len(lines) <= 3  # the start, the end: not a line per step (a report every 30 s in between)


@pytest.mark.parametrize("change, message", [({"action_channels": 2}, "set model.action_channels >= 4"),
                                             ({"state_channels": 2}, "set model.state_channels >= 4"),
                                             ({"patch": (3, 3)}, "not a multiple of model.patch")])
def test_a_robot_the_model_cannot_hold_is_one_error_naming_the_param(latent_cache, tmp_path, change, message):
    model = dataclasses.replace(preset("tiny").model, **change)
    with pytest.raises(LingbotError, match=message):
        train(CFG, model, latent_cache, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_each_process_loads_only_its_rows_of_the_global_batch(latent_cache):
    """A process's batch is its rows of the one-process batch (the same windows, the same draws); the noise
    of the global batch is drawn once and sliced. The 2-process DDP/FSDP runs above check the whole loop."""
    from lingbot.data.latents import LatentWindows
    from lingbot.model.world_model import draw_noise
    from lingbot.train.loop import StepSampler, rank_rows, select_episodes

    data = LatentWindows(latent_cache)
    sampler = StepSampler(data, CFG, select_episodes(data.manifest, CFG))
    whole = sampler.batch(5)
    assert [rank_rows(r, 2, CFG.batch_size) for r in (0, 1)] == [slice(0, 2), slice(2, 4)]
    for rank in (0, 1):
        rows = rank_rows(rank, 2, CFG.batch_size)
        mine = sampler.batch(5, rows=rows)
        assert len(mine["video"]) == 2
        assert all(torch.equal(mine[k], whole[k][rows]) for k in whole)
        sliced = draw_noise(mine, 16, 3.0, 0.5, torch.Generator().manual_seed(1), 0.5, batch_size=CFG.batch_size)
        full = draw_noise(whole, 16, 3.0, 0.5, torch.Generator().manual_seed(1), 0.5)
        assert all(torch.equal(sliced[k][rows], full[k][rows]) for k in full)


def test_checkpointed_and_compiled_layers_keep_names_keywords_and_results(latent_cache, tmp_path):
    """Activation checkpointing and per-layer compile change neither the parameter names (one checkpoint
    format) nor what a layer computes, in training and in the KV-cache step (keyword arguments reach the
    layer), at two window lengths (one graph for both: dynamic after the second)."""
    from lingbot.model.world_model import KVCache, WorldModel
    from lingbot.train.loop import apply_activation_checkpointing, compile_layers

    def model():
        torch.manual_seed(0)
        m = WorldModel(preset("tiny").model, cameras=2)
        torch.nn.init.normal_(m.video_out.weight, std=0.5)
        torch.nn.init.normal_(m.action_out.weight, std=0.5)
        return m

    plain, wrapped = model(), model()
    apply_activation_checkpointing(wrapped)
    compile_layers(wrapped, backend="eager")
    assert list(plain.state_dict()) == list(wrapped.state_dict())
    g = torch.Generator().manual_seed(0)
    for n in (2, 3):
        x = [torch.randn(1, n, 2, 4, 4, 4, generator=g), torch.randn(1, n, 2, 4, 4, 4, generator=g),
             torch.randn(1, n, 4, 16, generator=g), torch.randn(1, n, 4, 16, generator=g), torch.rand(1, n, generator=g),
             torch.rand(1, n, generator=g), torch.zeros(1, n), torch.randn(1, 1, 384, generator=g),
             torch.randn(1, n, 16, generator=g)]
        expected, got = plain(*x), wrapped(*x)
        got[1].sum().backward()  # recomputed in the backward
        for a, b in zip(expected, got):
            torch.testing.assert_close(a, b)
    text = torch.randn(1, 1, 384, generator=g)
    video = torch.randn(1, 2, 4, 4, 4, generator=g)
    with torch.no_grad():
        outs = [m.step(KVCache(m.cfg.depth), 0, m.encode_text(text), video=video, t_video=torch.zeros(1), clean=True)[0]
                for m in (plain, wrapped)]
    torch.testing.assert_close(outs[0], outs[1])


def test_checkpoints_record_the_precision_and_machine_they_trained_on(latent_cache, tmp_path):
    from lingbot.hardware import run_record

    report = train(dataclasses.replace(CFG, steps=1), preset("tiny").model, latent_cache, tmp_path, progress=False)
    trainer = json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())
    assert trainer["machine"] == report["machine"] == run_record("cpu", "fp32")  # CPUs train in fp32 (auto)


def test_every_batch_trains_the_longest_history_its_episodes_allow(latent_cache):
    """One window length per batch: the shortest chosen episode's, up to max_chunks (causal teacher
    forcing trains every shorter history in the same pass), never a shorter draw."""
    from lingbot.data.latents import LatentWindows
    from lingbot.train.loop import StepSampler, select_episodes

    data = LatentWindows(latent_cache)
    for max_chunks in (3, 50):
        cfg = dataclasses.replace(CFG, max_chunks=max_chunks)
        sampler = StepSampler(data, cfg, select_episodes(data.manifest, cfg))
        for step in range(6):
            b = sampler.batch(step)
            shortest = min(sampler.lengths[int(e)][0] for e in b["episode"])
            assert b["video"].shape[1] == min(max_chunks, shortest)
    with pytest.raises(LingbotError, match="max_chunks must be >= 2"):
        StepSampler(data, dataclasses.replace(CFG, max_chunks=1), select_episodes(data.manifest, CFG))


def test_one_lr_schedule_gives_each_trainer_its_own_factors_exactly():
    """The world model's, the VAE's and plain BC's schedules are one function; each gives the factors its
    trainer used before, bit for bit (the committed VAE and checkpoints depend on them)."""
    import math

    from lingbot.train.schedule import lr_factor

    steps, warmup = 1400, 20
    for s in range(steps + 1):
        vae = min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / max(1, steps)))
        assert lr_factor(s, steps, warmup, decay_from_start=True) == vae
        assert lr_factor(s, steps, decay_from_start=True) == 0.5 * (1 + math.cos(math.pi * s / steps))  # BC
        after = 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / (steps - warmup))))
        assert lr_factor(s, steps, warmup) == ((s + 1) / warmup if s < warmup else after)  # world model
        assert lr_factor(s, steps, warmup, "constant") == ((s + 1) / warmup if s < warmup else 1.0)
    assert lr_factor(0, 10, 4) == 0.25 and lr_factor(4, 10, 4) == 1.0 and lr_factor(10, 10, 4) == 0.0
