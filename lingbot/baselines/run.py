"""One baseline beside the world model: trained on the demos `finetune` uses (the latent cache's train
episodes of `finetune.tasks`, at most `finetune.max_episodes_per_task` each) and rolled out by
`lingbot.sim.evaluate` on the held-out episodes `evaluate` scores the world model on (`evaluate.tasks`,
seeds from `evaluate.seed`). The baseline stages of `baselines/dvc.yaml` run it; a sweep over seeds or
targets is a DVC experiment (docs/experiments.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from lingbot.baselines.lerobot_peers import PEERS
from lingbot.errors import LingbotError

KINDS = ("bc", *PEERS)


def run_baseline(kind: str, run, demos: Path, cache: Path, model_out: Path, eval_out: Path,
                 progress: bool = True) -> dict:
    """Train baseline `kind` (bc: `run.bc`; act, diffusion: `run.peers`) into `model_out`, roll it out
    into `eval_out`; return the evaluation summary with what was trained (demos, steps, seconds)."""
    from lingbot.data.latents import open_manifest
    from lingbot.sim.evaluate import evaluate
    from lingbot.train.loop import select_episodes

    if kind not in KINDS:
        raise LingbotError(f"baseline: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    if run.evaluate.env != "sim":
        raise LingbotError(f"baseline: evaluate.env is {run.evaluate.env!r}; the baselines are rolled out in "
                           "simulation (evaluate.env sim)")
    if kind == "bc":
        from lingbot.baselines.bc import load_bc, load_demos, save_bc, train_bc

        data = load_demos(Path(demos), Path(cache), run.finetune, run.bc.chunk)  # finetune's episodes
        episodes = data["episodes"]
        model, losses, seconds = train_bc(data, run.bc, progress)
        save_bc(model, data, run.bc, Path(model_out))
        trained = {"steps": run.bc.steps, "params": sum(p.numel() for p in model.parameters()),
                   "final_loss": round(float(np.mean(losses[-50:])), 4), "train_seconds": round(seconds, 1)}
        load = load_bc
    else:
        from lingbot.baselines.lerobot_peers import load_peer, train_peer_for

        episodes = select_episodes(open_manifest(Path(cache)), run.finetune)
        meta = train_peer_for(kind, Path(demos), episodes, Path(model_out), run.peers.budget_s,
                              run.peers.batch_size, run.peers.seed, run.threads)
        trained = {"steps": meta["steps"], "train_seconds": meta["train_seconds"]}
        load = load_peer
    # Videos show a world model's imagined frames beside the real ones: a baseline has none.
    summary = evaluate(Path(model_out), dataclasses.replace(run.evaluate, videos=0), Path(eval_out), progress,
                       load=load)
    return {"baseline": kind, "demos": len(episodes), **trained, **summary}
