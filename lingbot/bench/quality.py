"""Quality benchmarks on a run's data: the world model's recipe over chain seeds, plain image BC and
LeRobot's peers beside it, on the same demos and held-out episodes. Runs are kept under
`<out>/seed-<s>/<run_name>/` (world model, BC) and `<out>/<kind>/<run_name>/` (peers) and resumed."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def bench_bc(params: Path, steps: int | None, episodes: int | None, workers: int, seeds: list[int],
             targets: list[str], out: Path, demos: int | None = None) -> dict:
    """Plain image BC against the world model, per target, over chain seeds: the quality table.

    For each target (the params' evaluation tasks when none is given) and chain seed, the world model's
    recipe runs through `bench_seeds` (the dvc repro run stands for the params' own seed on its own
    tasks) and plain BC (`lingbot/baselines/bc.py`, seeded by the chain seed) trains on the same
    fine-tuning demos (the first `demos` of them when set); both are scored on the same held-out
    episodes. Runs are kept under `out/seed-<s>/<run_name>/` (BC in `bc/`) and not redone. Reads the
    workspace's data/demos, data/latents and models/vae: run `dvc repro` first.
    """
    from lingbot.baselines.bc import BCConfig, load_bc, load_demos, save_bc, train_bc
    from lingbot.config import chain_seeds, load_run_config
    from lingbot.data.latents import open_manifest
    from lingbot.errors import LingbotError
    from lingbot.train.loop import select_episodes
    from lingbot.fsutil import write_json
    from lingbot.eval.metrics import pooled_runs
    from lingbot.sim.evaluate import evaluate

    run_cfg = load_run_config(params)
    own = tuple(run_cfg.evaluate.tasks)
    result, per_target = {"bench": "bc", "seeds": ",".join(map(str, seeds))}, {}
    for target in targets or ["-".join(own)]:
        target_cfg = retarget(run_cfg, None if target == "-".join(own) else target, demos)
        tasks, finetune = tuple(target_cfg.evaluate.tasks), target_cfg.finetune
        key = run_name(tasks, demos)
        eval_cfg = dataclasses.replace(target_cfg.evaluate, videos=0, workers=workers,
                                       episodes=episodes or run_cfg.evaluate.episodes)
        with_run = tasks == own and run_cfg.seed in seeds and demos is None
        wm = bench_seeds(params, [s for s in seeds if not (with_run and s == run_cfg.seed)], workers, out,
                         with_run, None if tasks == own else target, episodes=eval_cfg.episodes, demos=demos)
        data = None
        bc_rows = []
        demo_count = len(select_episodes(open_manifest(Path("data/latents")), finetune))
        for seed in seeds:
            path = Path(out) / f"seed-{seed}" / key / "bc" / "result.json"
            seeded = chain_seeds(run_cfg, seed, sections=("finetune",)).finetune.seed
            cfg = BCConfig(seed=seeded) if steps is None else BCConfig(steps=steps, seed=seeded)
            if path.is_file() and any(json.loads(path.read_text())[k] != v for k, v in
                                      (("bc_seed", seeded), ("steps", cfg.steps), ("demos", demo_count))):
                raise LingbotError(f"{path.parent}: trained with other steps, seed or demos than asked; "
                                   "pass another --out")
            if not path.is_file():
                data = data or load_demos(Path("data/demos"), Path("data/latents"), finetune, cfg.chunk)
                model, losses, seconds = train_bc(data, cfg, progress=False)
                save_bc(model, data, cfg, path.parent / "policy")
                summary = evaluate(path.parent / "policy", eval_cfg, path.parent / "eval", progress=False, load=load_bc)
                write_json(path, {"seed": seed, "bc_seed": seeded, "steps": cfg.steps, "batch_size": cfg.batch_size,
                                  "params": sum(p.numel() for p in model.parameters()),
                                  "demos": len(data["episodes"]), "train_seconds": round(seconds, 1),
                                  "final_loss": round(float(np.mean(losses[-50:])), 4),
                                  "success_rate": summary["success_rate"], "episodes": summary["episodes"]})
            bc_rows.append(json.loads(path.read_text()))
        entry = {"demos": bc_rows[0]["demos"], "eval_seed": eval_cfg.seed, "episodes": eval_cfg.episodes}
        for name, rows in (("wm", wm["per_seed"]), ("bc", bc_rows)):
            pooled = pooled_runs(rows)
            entry |= {f"{name}_success": round(pooled["mean"], 4),
                      f"{name}_std": None if pooled["std"] is None else round(pooled["std"], 4),
                      f"{name}_wins_per_seed": pooled["wins"], f"{name}_ci_low": round(pooled["ci_low"], 4),
                      f"{name}_ci_high": round(pooled["ci_high"], 4)}
            seconds = [r["train_seconds"] for r in rows if r.get("train_seconds")]
            entry[f"{name}_train_seconds"] = round(float(np.mean(seconds)), 1) if seconds else None
        if entry["wm_train_seconds"] is None:  # the dvc repro run alone: its pretrain + finetune time
            entry["wm_train_seconds"] = round(sum(world_model_train_seconds(run_cfg).values()), 1) or None
        per_target[key] = entry
        for name in ("wm", "bc"):
            result[f"{key} {name}"] = (f"{entry[f'{name}_success']:.2f} over {len(seeds)} seed(s) "
                                       f"{entry[f'{name}_wins_per_seed']}, pooled [{entry[f'{name}_ci_low']:.2f}, "
                                       f"{entry[f'{name}_ci_high']:.2f}]")
    result["targets"] = per_target
    return result


def retarget(run_cfg, target: str | None, demos: int | None = None):
    """The run with MetaWorld task `target` as its fine-tuning and evaluation task (None: as it is),
    fine-tuned on its first `demos` training episodes (None: finetune.max_episodes_per_task as it is)."""
    from lingbot.sim.suite import task_description

    if demos is not None:
        if demos < 1:
            from lingbot.errors import LingbotError

            raise LingbotError(f"--demos {demos}: fine-tune on at least 1 demo")
        run_cfg = dataclasses.replace(run_cfg, finetune=dataclasses.replace(run_cfg.finetune,
                                                                            max_episodes_per_task=demos))
    if not target or (target,) == tuple(run_cfg.evaluate.tasks):
        return run_cfg
    return dataclasses.replace(
        run_cfg, finetune=dataclasses.replace(run_cfg.finetune, tasks=(task_description(target),)),
        evaluate=dataclasses.replace(run_cfg.evaluate, tasks=(target,)))


def run_name(tasks, demos: int | None) -> str:
    """A benchmark run's directory under its seed: the evaluated tasks, and the demo count when set
    (`push-v3`, `push-v3-10demos`), so a few-demo run never reads back a run on all the demos."""
    return "-".join(tasks) + (f"-{demos}demos" if demos is not None else "")


def world_model_train_seconds(run_cfg) -> dict[str, float]:
    """{stage: seconds} of the workspace run's pretrain and finetune (steps x batch / samples per s, from
    reports/<stage>.json and its timings); a stage without both files is left out."""
    from lingbot.fsutil import timings_path

    out = {}
    for name in ("pretrain", "finetune"):
        path = Path(f"reports/{name}.json")
        if path.is_file() and timings_path(path).is_file():
            r = json.loads(path.read_text()) | json.loads(timings_path(path).read_text())
            out[name] = r["steps"] * getattr(run_cfg, name).batch_size / r["samples_per_s"]
    return out


def _same_recipe(checkpoint: Path, model_cfg, train_cfg) -> bool:
    """Whether `checkpoint` was trained with this model and training config (fields it predates at
    their defaults): only then may a benchmark reuse it instead of training its own."""
    from lingbot.config import to_dict

    path = checkpoint / "config.json"
    if not (checkpoint / "trainer.json").is_file() or not path.is_file():
        return False
    saved = json.loads(path.read_text())
    for key, cfg in (("model", model_cfg), ("train", train_cfg)):
        defaults = json.loads(json.dumps(to_dict(type(cfg)())))
        wanted = json.loads(json.dumps(to_dict(cfg)))
        if any(saved[key].get(name, defaults[name]) != value for name, value in wanted.items()):
            return False
    return True


def bench_seeds(params: Path, seeds: list[int], workers: int, out: Path, with_run: bool,
                target: str | None = None, episodes: int | None = None, demos: int | None = None) -> dict:
    """The recipe, not one draw of it: pretrain -> finetune -> bundle -> evaluate once per chain seed.

    Each seed derives the seeds of pretrain, finetune and the policy (`chain_seeds`; the params' own
    seed is the `dvc repro` run, whose models/pretrain is then reused: same seed, same bytes) and
    trains on the workspace's data/latents and models/vae (run `dvc repro` first); every seed is scored
    on the same held-out evaluation episodes. `target`: fine-tune on and evaluate this MetaWorld task
    instead of the params' (from the same pretraining); `demos`: fine-tune on its first `demos` training
    episodes. A seed's pretraining goes to `out/seed-<s>/pretrain`, each run to
    `out/seed-<s>/<run_name>/`; finished parts are not run again (a stopped bench resumes), and a
    finished run of another recipe there (other params) is an error, not a result. `with_run`: add
    the workspace's own evaluation (reports/eval.json) as the row of the run's seed.
    """
    import torch

    from lingbot.config import chain_seeds, load_run_config
    from lingbot.errors import LingbotError
    from lingbot.fsutil import write_json
    from lingbot.eval.metrics import pooled_runs, wilson_interval
    from lingbot.policy.bundle import write_bundle
    from lingbot.sim.evaluate import evaluate
    from lingbot.train.loop import train

    run_cfg = retarget(load_run_config(params), target, demos)
    if with_run and demos is not None:
        raise LingbotError("bench seeds: --with-run adds the workspace's run, fine-tuned on all its demos; "
                           "drop --with-run or --demos")
    torch.set_num_threads(run_cfg.threads)
    latents, vae = Path("data/latents"), Path("models/vae")
    eval_cfg = dataclasses.replace(run_cfg.evaluate, videos=0, workers=workers,
                                   episodes=episodes or run_cfg.evaluate.episodes)
    name = run_name(eval_cfg.tasks, demos)
    rows = []
    if with_run:
        reported = json.loads(Path("reports/eval.json").read_text())
        if any(f"{task}/success_rate" not in reported for task in eval_cfg.tasks):
            raise LingbotError("bench seeds --with-run: reports/eval.json did not evaluate these tasks")
        rows.append({"seed": run_cfg.seed, "source": "reports/eval.json", "success_rate": reported["success_rate"],
                     "episodes": reported["episodes"]})
    for seed in seeds:
        work = Path(out) / f"seed-{seed}"
        result = work / name / "result.json"
        cfg = chain_seeds(run_cfg, seed, sections=("pretrain", "finetune", "policy"))
        if result.is_file() and not _same_recipe(work / name / "finetune" / "checkpoint", cfg.model, cfg.finetune):
            raise LingbotError(f"{result.parent}: fine-tuned by another recipe than {params}'s (model or finetune "
                               "differ); pass another --out")
        if not result.is_file():
            pretrain = work / "pretrain" / "checkpoint"
            pretrain_s = None
            if seed == run_cfg.seed and _same_recipe(Path("models/pretrain/checkpoint"), cfg.model, cfg.pretrain):
                pretrain = Path("models/pretrain/checkpoint")  # the dvc repro run's: its own training time
                pretrain_s = world_model_train_seconds(run_cfg).get("pretrain")
            pretrain_time = pretrain.parent / "seconds.json"  # a seed's pretraining, shared by its targets
            if not (pretrain / "trainer.json").is_file() or json.loads(
                    (pretrain / "trainer.json").read_text())["step"] < cfg.pretrain.steps:
                t0 = time.perf_counter()
                train(cfg.pretrain, cfg.model, latents, pretrain.parent, progress=False)
                write_json(pretrain_time, {"seconds": round(time.perf_counter() - t0, 1)})
            if pretrain_s is None and pretrain_time.is_file():
                pretrain_s = json.loads(pretrain_time.read_text())["seconds"]
            t0 = time.perf_counter()
            train(cfg.finetune, cfg.model, latents, work / name / "finetune", init_from=pretrain, progress=False)
            finetune_s = time.perf_counter() - t0
            write_bundle(work / name / "policy", work / name / "finetune" / "checkpoint", vae, latents, cfg.policy)
            summary = evaluate(work / name / "policy", eval_cfg, work / name / "eval", progress=False)
            write_json(result, {"seed": seed, "source": str(work / name), "success_rate": summary["success_rate"],
                                "episodes": summary["episodes"],
                                "train_seconds": round(finetune_s + pretrain_s, 1) if pretrain_s is not None else None,
                                "finetune_seconds": round(finetune_s, 1), "latency_ms": summary["latency_ms_p95"],
                                "pretrain_seed": cfg.pretrain.seed, "finetune_seed": cfg.finetune.seed})
        rows.append(json.loads(result.read_text()))
    pooled = pooled_runs(rows)
    wins = pooled["wins"]
    per_seed = {}
    for r, k in zip(rows, wins):
        low, high = wilson_interval(k, r["episodes"])
        label = f"seed{r['seed']}" + (" (dvc repro)" if r["source"] == "reports/eval.json" else "")
        per_seed[label] = f"{k}/{r['episodes']} [{low:.2f}, {high:.2f}]"
    return {
        "bench": "seeds",
        "tasks": ",".join(eval_cfg.tasks),
        "eval_seed": eval_cfg.seed,
        "runs": len(rows),
        **per_seed,
        "success_mean": round(pooled["mean"], 4),
        "success_std": None if pooled["std"] is None else round(pooled["std"], 4),
        "success_min": round(pooled["min"], 4),
        "success_max": round(pooled["max"], 4),
        "pooled_ci_low": round(pooled["ci_low"], 4),
        "pooled_ci_high": round(pooled["ci_high"], 4),
        "per_seed": [dict(r, wins=k) for r, k in zip(rows, wins)],
    }


def _world_model_row(params: Path, run_cfg, own: tuple, demos: int | None, workers: int, seeds_out: Path) -> dict:
    """The world model's row of the peers table for `run_cfg` (retargeted), demos left to the caller:
    the workspace's `dvc repro` run (reports/) when it is this recipe on its own task, else the recipe
    run by `bench_seeds` at the params' seed (kept in `seeds_out`)."""
    from lingbot.errors import LingbotError
    from lingbot.fsutil import timings_path
    from lingbot.eval.metrics import wilson_interval

    target, own_task = run_cfg.evaluate.tasks[0], tuple(run_cfg.evaluate.tasks) == own
    row = {"method": "lingbot world model", "target": target}
    if not own_task or not _same_recipe(Path("models/finetune/checkpoint"), run_cfg.model, run_cfg.finetune):
        wm = bench_seeds(params, [run_cfg.seed], workers, seeds_out, False, None if own_task else target,
                         demos=demos)["per_seed"][0]
        low, high = wilson_interval(wm["wins"], wm["episodes"])
        return row | {"train_s": wm["train_seconds"], "success": wm["success_rate"], "ci_low": round(low, 4),
                      "ci_high": round(high, 4), "latency_ms": wm["latency_ms"]}
    reported = json.loads(Path("reports/eval.json").read_text())
    timings = json.loads(timings_path(Path("reports/eval.json")).read_text())
    trained = world_model_train_seconds(run_cfg)
    if len(trained) != 2:
        raise LingbotError("bench peers: reports/pretrain.json and reports/finetune.json (with their timings) are "
                           "missing; run `dvc repro` first")
    return row | {"train_s": round(sum(trained.values()), 1), "success": reported[f"{target}/success_rate"],
                  "ci_low": reported[f"{target}/success_ci_low"], "ci_high": reported[f"{target}/success_ci_high"],
                  "latency_ms": timings.get("latency_ms_p95")}


def bench_peers(params: Path, peers: list[str], budget_s: float | None, workers: int, out: Path,
                target: str | None = None, seeds_out: Path = Path("models/seeds"), demos: int | None = None) -> dict:
    """LeRobot's ACT and Diffusion Policy trained by `lerobot-train` on the target task's training
    demos (finetune's episodes, the first `demos` of them when set) for the world model's training
    time, rolled out by `evaluate` on its held-out seeds. The world model's row is the workspace's run
    (run `dvc repro` first) when it is this recipe; otherwise (another `target`, `demos` or model) the
    recipe fine-tuned by `bench_seeds` at the params' seed (kept in `seeds_out`, shared with bench
    seeds and bench bc). Peers are kept in `out/<kind>/<run_name>/`.

    Each peer's steps come from a calibration: a 40-step `lerobot-train` run, whose own log gives the
    seconds per step after the warm-up (its update and data-loading times) and whose wall time less
    those steps the start-up; steps = (budget - start-up) / seconds per step. (Two short runs' wall
    times differenced, as before, gave 695k steps when the shorter run was slowed by another process.)
    A peer already trained
    under `out` is not trained again (a stopped bench resumes).
    """
    from lingbot.baselines.lerobot_peers import load_peer, train_peer
    from lingbot.config import load_run_config
    from lingbot.data.latents import LatentWindows
    from lingbot.errors import LingbotError
    from lingbot.fsutil import write_json
    from lingbot.eval.metrics import wilson_interval
    from lingbot.sim.evaluate import evaluate
    from lingbot.train.loop import select_episodes

    run_cfg = load_run_config(params)
    own = tuple(run_cfg.evaluate.tasks)
    run_cfg = retarget(run_cfg, target, demos)
    eval_cfg = dataclasses.replace(run_cfg.evaluate, videos=0, workers=workers)
    if len(eval_cfg.tasks) != 1:
        raise ValueError("bench peers: evaluate one task (evaluate.tasks) at a time")
    target, name = eval_cfg.tasks[0], run_name(eval_cfg.tasks, demos)
    episodes = select_episodes(LatentWindows(Path("data/latents")).manifest, run_cfg.finetune)
    rows = [_world_model_row(params, run_cfg, own, demos, workers, seeds_out) | {"demos": len(episodes)}]
    budget = budget_s or rows[0]["train_s"]
    if not budget:
        raise LingbotError(f"bench peers: the world model's training time on {target} is not known (its "
                           "pretraining was not timed here); pass --budget-s")
    for kind in peers:
        work = Path(out) / kind / name
        result = work / "result.json"
        trained = work / "model" / "lingbot_peer.json"
        if trained.is_file() and json.loads(trained.read_text())["episodes"] != sorted(episodes):
            raise LingbotError(f"{work}: trained on other episodes than {params}'s {target} demos; pass another --out")
        if not result.is_file():
            if not trained.is_file():
                with tempfile.TemporaryDirectory(prefix="lingbot-calibrate-") as tmp:
                    probe = train_peer(kind, Path("data/demos"), episodes, Path(tmp) / "probe", 40,
                                       threads=run_cfg.threads)
                start_up = max(0.0, probe["train_seconds"] - 40 * probe["step_seconds"])
                steps = max(10, int((budget - start_up) / probe["step_seconds"]))
                train_peer(kind, Path("data/demos"), episodes, work / "model", steps, threads=run_cfg.threads)
            meta = json.loads(trained.read_text())
            summary = evaluate(work / "model", eval_cfg, work / "eval", progress=False, load=load_peer)
            low, high = wilson_interval(round(summary["success_rate"] * summary["episodes"]), summary["episodes"])
            write_json(result, {"method": f"LeRobot {kind}", "target": target, "demos": len(episodes),
                                "train_s": meta["train_seconds"], "steps": meta["steps"],
                                "success": summary["success_rate"], "ci_low": round(low, 4),
                                "ci_high": round(high, 4), "latency_ms": summary["latency_ms_p95"]})
        rows.append(json.loads(result.read_text()))
    table = {f"{r['method']} ({r['target']})": f"{r['success']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}], "
             f"{r['train_s']:.0f} s" for r in rows}
    return {"bench": "peers", "eval_seed": eval_cfg.seed, "episodes": eval_cfg.episodes, **table, "rows": rows}
