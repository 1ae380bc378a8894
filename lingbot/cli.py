"""`lingbot` command line: one subcommand per pipeline step, plus benchmarks.

Only argparse is imported at start-up; each subcommand imports what it needs, so `lingbot --help`
stays well under a second. Bad input ends with one line, `lingbot: error: ...`, and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path


def _run_config(args):
    """The run's config: the params file or preset, then `--set FIELD=VALUE` and the command's field flags
    (each a named `--set`, e.g. collect's `--episodes` is `collect.episodes`), all through
    `config.override`. Also pins torch's CPU threads to its `threads` (results depend on them)."""
    from lingbot.config import assignments, dotted_change, load_run_config, override, preset

    run = load_run_config(args.params) if args.params else preset(args.preset)
    run = override(run, assignments(run, args.set))
    for field, dest in args.fields.items():
        value = getattr(args, dest)
        if value is not None and value != []:
            run = override(run, dotted_change(field, value))
    if args.command in TORCH_COMMANDS:
        import torch

        torch.set_num_threads(run.threads)
    return run


# Subcommands whose results are torch computations (threads pinned before any of it runs).
TORCH_COMMANDS = ("fit-vae", "score-vae", "cache-latents", "pretrain", "finetune", "evaluate", "baseline")


def _print_json(data: dict) -> None:
    print(json.dumps(data, sort_keys=False))


def _write_metrics(args, data: dict) -> None:
    """Numbers (and flags) only: the DVC metrics file of the stage, what the run computed, and beside it
    (`timings_path`, kept in git but not by DVC) how long it took and on what machine (`data["machine"]`,
    `lingbot.hardware.run_record`). So `dvc.lock` records only results:
    the same params and code give the same lock file."""
    if getattr(args, "metrics", None):
        from lingbot.fsutil import is_timing, timings_path, write_json

        numbers = {k: v for k, v in data.items() if isinstance(v, (int, float, bool))}
        write_json(Path(args.metrics), {k: v for k, v in numbers.items() if not is_timing(k)})
        timings = {k: v for k, v in numbers.items() if is_timing(k)}
        if timings:
            # The machine (precision, CPU ISA or GPU, torch) the times were measured on, beside them.
            if isinstance(data.get("machine"), dict):
                timings["machine"] = data["machine"]
            write_json(timings_path(Path(args.metrics)), timings)


def cmd_collect(args) -> int:
    from lingbot.data.collect import collect

    run = _run_config(args)
    source = run.ingest.source
    if args.for_ingest and os.path.normpath(source) != os.path.normpath(args.out):
        # A dataset of one's own robot: nothing to simulate. The stage still leaves its out (DVC wants it).
        from lingbot.fsutil import atomic_dir, write_json

        with atomic_dir(Path(args.out)) as tmp:
            tmp.mkdir()
            write_json(tmp / "SKIPPED.json", {"reason": "ingest.source reads another dataset", "source": source})
        report = {"episodes": 0, "frames": 0}
        _write_metrics(args, report)
        print(f"collect: skipped, ingest.source is {source!r} (not {args.out})")
        return 0
    from lingbot.cluster import active

    report = collect(run.collect, Path(args.out), progress=not args.quiet, cluster=active(run.cluster))
    _write_metrics(args, report)
    _print_json(report)
    return 0


def cmd_ingest(args) -> int:
    from lingbot.data.ingest import ingest

    report = ingest(_run_config(args).ingest, Path(args.out))
    _write_metrics(args, report)
    _print_json(report)
    return 0


def cmd_validate(args) -> int:
    from lingbot.data.validate import validate

    cfg = _run_config(args).validate
    report = validate(Path(args.dir), cfg, report_dir=Path(args.report) if args.report else None)
    # Only what the data is: later stages depend on this file, so no timings (they change every run).
    _write_metrics(args, {k: report[k] for k in ("success", "expectations", "frames", "episodes")}
                   | {"failed": len(report["failed"])})
    if not report["success"]:
        for line in report["failures_text"]:
            print(line)
        print(f"validation FAILED: {len(report['failed'])} of {report['expectations']} expectations")
        return 1
    print(
        f"validation passed: {report['expectations']} expectations over {report['frames']} frames, "
        f"{report['episodes']} episodes"
    )
    return 0


def cmd_fit_vae(args) -> int:
    from lingbot.vae.fit import fit_vae

    cfg = _run_config(args).vae
    if args.pretrained and args.subfolder is None:  # a VAE named here does not take the params' subfolder
        cfg = dataclasses.replace(cfg, subfolder="")
    report = fit_vae(cfg, Path(args.demos), Path(args.out), grid_png=args.grid and Path(args.grid),
                     log_tsv=args.log and Path(args.log), progress=not args.quiet)
    _write_metrics(args, report)
    _print_json(report)
    return 0


def cmd_score_vae(args) -> int:
    from lingbot.eval.objects import score_vae_objects

    from lingbot.vae.fit import read_demos

    _run_config(args)
    if "observation.environment_state" not in read_demos(Path(args.demos))[2].features:
        # A robot's own dataset does not say where its objects are: nothing to score, and no error (the
        # chain goes on); lingbot's MetaWorld collection records them.
        report = {"scored": False, "episodes": 0}
    else:
        report = score_vae_objects(Path(args.demos), Path(args.vae), episodes=args.episodes or 0)
        if args.probe:
            from lingbot.eval.objects import probe_object_positions

            report["probe"] = probe_object_positions(Path(args.demos), Path(args.vae), args.probe)
    if args.metrics:  # per task as well: nested numbers stay in the metrics file
        from lingbot.fsutil import write_json

        write_json(Path(args.metrics), report)
    _print_json(report)
    return 0


def cmd_cache_latents(args) -> int:
    from lingbot.data.latents import build_cache
    from lingbot.errors import LingbotError

    from lingbot.cluster import enabled

    run = _run_config(args)
    cfg = run.latents
    try:
        index, count = (int(v) for v in args.shard.split("/"))
    except ValueError:
        raise LingbotError(f"--shard must look like i/n (e.g. 0/4), got {args.shard!r}") from None
    if enabled(run.cluster) and (index, count) == (0, 1):  # every shard, one cluster job each
        from lingbot.data.latents import build_cache_on_cluster

        report = build_cache_on_cluster(Path(args.demos), Path(args.vae), Path(args.out), cfg, run.cluster,
                                        run.threads, rebuild=args.rebuild)
    else:
        report = build_cache(Path(args.demos), Path(args.vae), Path(args.out), cfg, shard=(index, count),
                             rebuild=args.rebuild, progress=not args.quiet)
    from lingbot.hardware import run_record

    report["machine"] = run_record("cpu", "fp32")  # the VAE encodes on the CPU, in fp32
    _write_metrics(args, report)
    _print_json(report)
    return 0


def cmd_train(args) -> int:
    from lingbot.train.loop import train

    run = _run_config(args)
    report = train(getattr(run, args.command), run.model, Path(args.cache), Path(args.out),
                   init_from=Path(args.init) if args.init else None, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        if args.log:
            from lingbot.fsutil import atomic_file

            with atomic_file(Path(args.log)) as tmp:
                shutil.copyfile(Path(args.out) / "log.tsv", tmp)
        _write_metrics(args, report)
        _print_json(report)
    return 0


def cmd_serve(args) -> int:
    import logging

    from lingbot.policy.server import serve

    logging.basicConfig(level=logging.INFO, format="lingbot serve: %(message)s")

    def ready(host: str, port: int) -> None:
        _print_json({"listening": f"ws://{host}:{port}", "policy": str(args.policy)})
        sys.stdout.flush()

    policy = Path(args.policy)
    if not policy.exists() and "/" in args.policy and not args.policy.startswith((".", "/")):
        # A release `org/name@tag`: pulled (sha256-verified) into a local directory first.
        from lingbot.hub.pull import pull

        policy = Path(args.release_dir or Path.home() / ".cache" / "lingbot" / "releases" / args.policy.replace("@", "/"))
        pull(args.policy, policy, local_hub=args.local_hub and Path(args.local_hub))
    report = serve(policy, args.host, args.port, device=args.device, dtype=args.dtype,
                   max_message_bytes=args.max_message_bytes, on_ready=ready)
    _print_json(report)
    return 0


def cmd_evaluate(args) -> int:
    from lingbot.errors import LingbotError

    run = _run_config(args)
    cfg = run.evaluate
    if cfg.env not in ("sim", "offline", "lerobot"):
        hint = " (lingbot's own MetaWorld rollouts are env sim)" if cfg.env == "metaworld" else ""
        raise LingbotError(f"evaluate.env must be sim, offline or lerobot, got {cfg.env!r}{hint}")
    if cfg.env == "offline" and not args.demos:
        raise LingbotError("evaluate --env offline needs --demos (the ingested dataset with its held-out split)")
    policy = Path(args.policy)
    if args.checkpoint:  # assemble the bundle from the training run first (stage evaluate does)
        from lingbot.policy.bundle import write_bundle

        if not (args.vae and args.cache):
            raise LingbotError("evaluate --checkpoint needs --vae and --cache to assemble the bundle")
        write_bundle(policy, Path(args.checkpoint), Path(args.vae), Path(args.cache), run.policy,
                     Path(args.demos) if args.demos else None)
    out = Path(args.out)
    summary, results = {}, out
    if cfg.env == "sim":
        from lingbot.sim.evaluate import evaluate

        from lingbot.cluster import active

        summary = evaluate(policy, cfg, out, progress=not args.quiet, cluster=active(run.cluster))
    elif cfg.env == "lerobot":
        from lingbot.sim.lerobot_env import evaluate_lerobot

        summary = evaluate_lerobot(policy, cfg, out)
    elif out.exists():  # no simulator: nothing of an earlier rollout may stay beside the new scores
        shutil.rmtree(out)
    if args.demos:
        from lingbot.eval.offline import evaluate_offline

        tasks = run.finetune.tasks
        if cfg.env == "sim":
            from lingbot.sim.suite import task_description

            tasks = tuple(task_description(t) for t in cfg.tasks)
        offline = evaluate_offline(policy, Path(args.demos), out / "offline", tasks, cfg.offline_episodes, cfg.seed,
                                   cfg.videos, progress=not args.quiet, missing_ok=cfg.env != "offline")
        summary |= {f"offline/{k}": v for k, v in offline.items()}
        if cfg.env == "offline":
            results = out / "offline"
    if args.tasks_tsv and args.latency_tsv:
        from lingbot.sim.evaluate import write_plots

        write_plots(summary, results, cfg.tasks if cfg.env != "offline" else (), Path(args.tasks_tsv),
                    Path(args.latency_tsv), Path(args.error_tsv) if args.error_tsv else None,
                    simulated=cfg.env == "sim")
    from lingbot.hardware import run_record

    summary["machine"] = run_record("cpu", "fp32")  # rollout workers load the policy on the CPU, in fp32
    _write_metrics(args, summary)
    if cfg.env != "offline":
        _print_success(summary, cfg.tasks)
    if "offline/action_error" in summary:
        print(f"offline: action error {summary['offline/action_error']:.4f} (normalised) over "
              f"{summary['offline/episodes']} held-out episodes, {summary['offline/chunks']} chunks")
    _print_json(summary)
    return 0


def _print_success(summary: dict, tasks) -> None:
    for task in tasks:
        print(f"{task}: success {summary[f'{task}/success_rate']:.0%} "
              f"[{summary[f'{task}/success_ci_low']:.2f}, {summary[f'{task}/success_ci_high']:.2f}] "
              f"over {summary[f'{task}/episodes']} episodes")


def cmd_baseline(args) -> int:
    from lingbot.baselines.run import run_baseline

    run = _run_config(args)
    summary = run_baseline(args.kind, run, Path(args.demos), Path(args.cache), Path(args.out),
                           Path(args.eval_out), progress=not args.quiet)
    from lingbot.hardware import run_record

    summary["machine"] = run_record("cpu", "fp32")
    _write_metrics(args, summary)
    _print_success(summary, run.evaluate.tasks)
    _print_json(summary)
    return 0


def cmd_experiments(args) -> int:
    import subprocess

    from lingbot.errors import LingbotError
    from lingbot.eval.experiments import pool_experiments, runs_of

    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json", *(["-A"] if args.all_commits else [])],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise LingbotError(f"dvc exp show failed: {lines[-1] if lines else proc.returncode}")
    from lingbot.baselines.run import KINDS

    metrics = args.metrics or ["reports/eval.json", *(f"reports/baselines/{kind}.json" for kind in KINDS)]
    table = pool_experiments(runs_of(json.loads(proc.stdout)), metrics)
    for row in table:
        runs = ", ".join(f"{name} {wins}/{n}" for name, wins, n in zip(row["runs"], row["wins"], row["episodes"]))
        print(f"{row['metrics']}: {row['mean']:.1%} over {len(row['runs'])} run(s) ({runs}), "
              f"pooled Wilson [{row['ci_low']:.2f}, {row['ci_high']:.2f}]")
    _print_json({"recipes": table})
    return 0


def _no_hub_progress_bars():
    from huggingface_hub.utils import disable_progress_bars

    return disable_progress_bars()  # a context manager: bars come back on exit


def cmd_publish(args) -> int:
    from contextlib import nullcontext

    from lingbot.hub.publish import publish

    cfg = _run_config(args).publish
    with _no_hub_progress_bars() if args.quiet else nullcontext():
        report = publish(Path(args.bundle), Path(args.eval), cfg, params=args.params and Path(args.params),
                         lock=args.lock and Path(args.lock), demos=args.demos and Path(args.demos))
    # Not the release's bytes: its model card quotes the run's latencies, so its size varies run to run.
    _write_metrics(args, {k: report[k] for k in ("version", "files")})
    _print_json(report)
    return 0


def cmd_pull(args) -> int:
    from lingbot.hub.pull import pull

    report = pull(args.spec, Path(args.dir), local_hub=args.local_hub and Path(args.local_hub))
    _print_json(report)
    return 0


def cmd_bench(args) -> int:
    from lingbot import bench

    return bench.run(args.what, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lingbot", description="Train, evaluate and ship LingBot-VA style video-action policies."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        g = p.add_mutually_exclusive_group()
        g.add_argument("--params", help="params.yaml to read (preset + overrides)")
        g.add_argument("--preset", default="small", help="named preset (default: small)")
        p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="override any config field, dotted (collect.episodes=20, evaluate.tasks=[push-v3]); "
                            "repeatable, applied after --params/--preset")
        p.set_defaults(fields={})
        return p

    def field(p, flag, name, **kwargs):
        """A flag that sets config field `name` (a named --set), e.g. collect's --episodes."""
        dest = kwargs.pop("dest", flag.lstrip("-").replace("-", "_"))
        if flag.startswith("-"):
            p.add_argument(flag, dest=dest, **kwargs)
        else:
            p.add_argument(dest, **kwargs)
        p.set_defaults(fields={**p.get_default("fields"), name: dest})

    p = with_config(sub.add_parser("collect", help="scripted-expert MetaWorld or ALOHA demos -> LeRobot v3 dataset"))
    field(p, "--task", "collect.tasks", action="append",
          help="task id, e.g. drawer-open-v3, our memory task button-press-twice, aloha-transfer-cube (repeatable)")
    field(p, "--episodes", "collect.episodes", type=int, help="successful episodes per task")
    field(p, "--camera", "collect.cameras", action="append", help="MuJoCo camera name (repeatable)")
    field(p, "--image-size", "collect.image_size", type=int)
    field(p, "--seed", "collect.seed", type=int)
    field(p, "--workers", "collect.workers", type=int, help="rollout processes")
    p.add_argument("--out", required=True, help="dataset directory to write (replaced atomically)")
    p.add_argument("--for-ingest", dest="for_ingest", action="store_true",
                   help="collect only if the params' ingest.source is --out (else leave a placeholder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--metrics", help="write the numeric report here (DVC metrics JSON)")
    p.set_defaults(func=cmd_collect)

    p = with_config(sub.add_parser("ingest", help="take in a LeRobot v3 dataset: keys, split, stats"))
    field(p, "source", "ingest.source", help="local dataset directory, or Hub dataset org/name@revision")
    field(p, "--camera", "ingest.cameras", action="append", help="camera feature key (repeatable; default: all)")
    field(p, "--state", "ingest.state", help="state feature key (default observation.state)")
    field(p, "--action", "ingest.action", help="action feature key (default action)")
    p.add_argument("--out", required=True, help="ingest directory to write (replaced atomically)")
    p.add_argument("--metrics", help="write the numeric report here (DVC metrics JSON)")
    p.set_defaults(func=cmd_ingest)

    p = with_config(sub.add_parser("validate", help="Great Expectations gate over an ingested dataset"))
    p.add_argument("dir", help="ingest directory (or a bare LeRobot v3 dataset directory)")
    p.add_argument("--report", help="directory for report.json and GX data docs")
    p.add_argument("--metrics", help="write the numeric report here (DVC metrics JSON)")
    p.set_defaults(func=cmd_validate)

    p = with_config(sub.add_parser("fit-vae", help="train (or load) the causal video VAE; PSNR/SSIM on held-out"))
    p.add_argument("demos", help="ingest directory")
    p.add_argument("--out", required=True, help="VAE directory to write (diffusers layout)")
    field(p, "--pretrained", "vae.pretrained", help="use this VAE (Hub org/name[@rev] or local dir) instead of training")
    field(p, "--subfolder", "vae.subfolder", help="subfolder of --pretrained holding the VAE (e.g. vae)")
    field(p, "--steps", "vae.steps", type=int, help="training steps")
    p.add_argument("--grid", help="PNG of held-out originals over reconstructions")
    p.add_argument("--log", help="per-step training log (TSV)")
    p.add_argument("--metrics", help="write the numeric report here (DVC metrics JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fit_vae)

    p = with_config(sub.add_parser("score-vae", help="PSNR of a VAE's reconstructions around the objects and goals"))
    p.add_argument("demos", help="ingest directory (its held-out episodes are scored)")
    p.add_argument("--vae", required=True, help="VAE directory (diffusers layout)")
    p.add_argument("--episodes", type=int, help="score the first N held-out episodes only")
    p.add_argument("--probe", metavar="CAMERA", help="also score a linear read-out of the objects' pixels from "
                   "this fixed camera's latents, each episode read by a fit on the others")
    p.add_argument("--metrics", help="write the report here (DVC metrics JSON)")
    p.set_defaults(func=cmd_score_vae)

    p = with_config(sub.add_parser("cache-latents", help="encode every episode into the latent cache"))
    p.add_argument("demos", help="ingest directory")
    p.add_argument("--vae", required=True, help="VAE directory (from fit-vae)")
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--shard", default="0/1", help="i/n: encode only shards s with s %% n == i (fan-out)")
    p.add_argument("--rebuild", action="store_true", help="discard a cache built from other inputs")
    p.add_argument("--metrics", help="write the numeric report here (DVC metrics JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_cache_latents)

    for name, text in (("pretrain", "multi-task world-model training on the latent cache"),
                       ("finetune", "continue from a pretrain checkpoint on the target task(s)")):
        p = with_config(sub.add_parser(name, help=text))
        p.add_argument("cache", help="latent cache directory")
        p.add_argument("--out", required=True, help="run directory (checkpoint/, log.tsv); resumes if present")
        p.add_argument("--init", required=(name == "finetune"), help="checkpoint whose EMA weights start the run")
        field(p, "--steps", f"{name}.steps", type=int, help="total optimizer steps")
        p.add_argument("--log", help="copy the per-step loss log here (TSV, for DVC plots)")
        p.add_argument("--metrics", help="write the numeric report here (DVC metrics JSON)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("serve", help="websocket policy server (openpi protocol) for robots and clients")
    p.add_argument("--policy", required=True, help="policy bundle directory, or a release org/name@tag (pulled)")
    p.add_argument("--local-hub", dest="local_hub", help="pull the release from this local hub root")
    p.add_argument("--release-dir", dest="release_dir", help="where a pulled release goes (default ~/.cache/lingbot)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    p.add_argument("--device", default="cpu", help="torch device of the policy (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="world-model weights: auto is bf16 on a GPU with native bf16, fp32 on CPUs")
    p.add_argument("--max-message-bytes", type=int, dest="max_message_bytes", default=16 * 2**20,
                   help="larger client messages get an error reply (default 16 MiB)")
    p.set_defaults(func=cmd_serve)

    p = with_config(sub.add_parser("evaluate", help="roll a policy bundle out in simulation: success, latency"))
    p.add_argument("--policy", required=True, help="policy bundle directory (written first with --checkpoint)")
    p.add_argument("--checkpoint", help="training checkpoint to assemble the bundle from (with --vae, --cache)")
    p.add_argument("--vae", help="VAE directory the checkpoint was trained with")
    p.add_argument("--cache", help="latent cache the checkpoint was trained on (stats, task embeddings)")
    p.add_argument("--demos", help="ingested dataset: score the policy open loop on its held-out episodes too")
    field(p, "--env", "evaluate.env", choices=["sim", "offline"], help="override evaluate.env")
    field(p, "--task", "evaluate.tasks", action="append", help="MetaWorld or ALOHA task id (repeatable; default: params)")
    field(p, "--episodes", "evaluate.episodes", type=int, help="episodes per task")
    field(p, "--seed", "evaluate.seed", type=int, help="first episode seed (default: params; another base gives a tuning set)")
    field(p, "--workers", "evaluate.workers", type=int, help="rollout processes")
    field(p, "--videos", "evaluate.videos", type=int, help="rollout videos to write")
    p.add_argument("--out", required=True, help="results directory (episodes.json, videos/)")
    p.add_argument("--tasks-tsv", dest="tasks_tsv", help="per-task success plot (TSV)")
    p.add_argument("--latency-tsv", dest="latency_tsv", help="latency per chunk plot (TSV)")
    p.add_argument("--error-tsv", dest="error_tsv", help="open-loop action error per horizon step plot (TSV)")
    p.add_argument("--metrics", help="write the numeric report here (DVC metrics JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = with_config(sub.add_parser("baseline", help="train a baseline (bc, act, diffusion) on the fine-tuning demos, "
                                                    "roll it out on evaluate's held-out episodes"))
    p.add_argument("kind", help="bc (plain image BC), act or diffusion (LeRobot's, through lerobot-train)")
    p.add_argument("--demos", required=True, help="ingested dataset (data/demos)")
    p.add_argument("--cache", required=True, help="latent cache: which episodes finetune trains on")
    p.add_argument("--out", required=True, help="the trained baseline's directory")
    p.add_argument("--eval-out", dest="eval_out", required=True, help="its rollouts (episodes.json)")
    p.add_argument("--metrics", help="write the numeric report here (DVC metrics JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_baseline)

    p = with_config(sub.add_parser("publish", help="gate on the evaluation, release the policy bundle as tag vN"))
    p.add_argument("bundle", help="policy bundle directory (models/policy)")
    p.add_argument("--eval", required=True, help="evaluation metrics JSON (reports/eval.json)")
    p.add_argument("--lock", help="dvc.lock: the upstream stages' hashes for the model card")
    p.add_argument("--demos", help="data/demos/lingbot.json: the dataset id, revision and fingerprint")
    field(p, "--repo-id", "publish.repo_id", help="override publish.repo_id (org/name)")
    field(p, "--target", "publish.target", choices=["local", "hub"], help="override publish.target")
    field(p, "--local-dir", "publish.local_dir", help="override publish.local_dir (the local hub root)")
    field(p, "--min-success", "publish.min_success", type=float, help="override publish.min_success")
    p.add_argument("--metrics", help="write the numeric report here (DVC metrics JSON)")
    p.add_argument("--quiet", action="store_true", help="no upload progress bars")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("experiments", help="success per recipe pooled over its seeds, from `dvc exp show`")
    p.add_argument("--metrics", nargs="+", help="metrics files with success_rate and episodes (default: "
                   "reports/eval.json and every baseline's reports/baselines/KIND.json)")
    p.add_argument("-A", "--all-commits", dest="all_commits", action="store_true",
                   help="every commit's runs and experiments, not only HEAD's")
    p.set_defaults(func=cmd_experiments)

    p = sub.add_parser("pull", help="fetch a release (REPO@TAG), verify every file, write DIR")
    p.add_argument("spec", help="org/name@vN (no @TAG: the newest release)")
    p.add_argument("--dir", required=True, help="directory to write (replaced atomically once verified)")
    p.add_argument("--local-hub", dest="local_hub", help="pull from this local hub root instead of the Hub")
    p.set_defaults(func=cmd_pull)

    bench = sub.add_parser("bench", help="benchmarks: print a table, then one JSON line")
    benches = bench.add_subparsers(dest="what", required=True)

    def benchmark(name, text, params=False, workers=False):
        p = benches.add_parser(name, help=text)
        if params:
            p.add_argument("--params", default="params.yaml", help="the run (a completed dvc repro) whose data it uses")
        if workers:
            p.add_argument("--workers", type=int, default=2, help="rollout processes")
        p.set_defaults(func=cmd_bench)
        return p

    p = benchmark("data", "collect and validate throughput", workers=True)
    p.add_argument("--episodes", type=int, default=4, help="episodes per task to collect")
    p = benchmark("latents", "VAE encoding, streaming vs whole clips, the cache's loader, Dask fan-out", workers=True)
    p.add_argument("--episodes", type=int, default=4, help="episodes per task to collect and encode")
    p = benchmark("vae", "the VAE's training step in fp32 and bf16 autocast")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per precision")
    p = benchmark("frames", "the recorded frames against raw renders, per video encoder", params=True)
    p.add_argument("--episodes", type=int, default=3, help="episodes per task")
    p.add_argument("--target", help="comma-separated tasks (default: the params' collect.tasks)")
    p = benchmark("train", "world-model training throughput")
    p.add_argument("--preset", default="small", help="model preset")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p = benchmark("realtime", "chunk latency with the KV cache against recomputing the sequence")
    p.add_argument("--preset", default="small", help="model preset")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lingbot.errors import LingbotError

    try:
        return args.func(args)
    except LingbotError as exc:
        print(f"lingbot: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lingbot: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
