"""The model card (README.md of a release), built with huggingface_hub's ModelCard.

YAML metadata (library, tags, dataset, model-index with the success rates) on top; the body holds the
evaluation table, the training data (dataset id, revision, commit, fingerprint), the DVC lock hashes of
every upstream stage, the params, and how to run the policy.
"""

from __future__ import annotations

TAGS = ["robotics", "lerobot", "lingbot-va"]


def _fmt(value, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _per_task(metrics: dict) -> dict[str, dict]:
    tasks: dict[str, dict] = {}
    for key, value in metrics.items():
        if key.startswith("offline/"):  # the open-loop scores have their own table
            continue
        task, sep, name = key.rpartition("/")
        if sep and task:
            tasks.setdefault(task, {})[name] = value
    return dict(sorted(tasks.items()))


def _offline_section(metrics: dict) -> list[str]:
    """The open-loop scores on the dataset's held-out episodes (the gate's figure without a simulator)."""
    m = {k[len("offline/"):]: v for k, v in metrics.items() if k.startswith("offline/")}
    if not m:
        return []
    steps = sorted(int(k.rpartition("step")[2]) for k in m if k.startswith("action_error_step"))
    joints = [k.partition("/")[2] for k in m if k.startswith("action_error/")]
    lines = [
        "Open loop on the dataset's held-out episodes: the recorded frames streamed in as at run time, each "
        "predicted chunk compared with the recorded actions (normalised units: the dataset's 1%..99% quantile "
        "span of each channel is 2):",
        "",
        "| metric | value |",
        "|---|---|",
        f"| action error, mean absolute (normalised) | {_fmt(m.get('action_error'), '.4f')} |",
        f"| held-out episodes / chunks | {_fmt(m.get('episodes'), 'g')} / {_fmt(m.get('chunks'), 'g')} |",
        f"| imagined video PSNR (dB) / the VAE's own | {_fmt(m.get('imagined_psnr_db'), '.2f')} / "
        f"{_fmt(m.get('reconstruction_psnr_db'), '.2f')} |",
        f"| chunk latency, mean / p95 (ms) | {_fmt(m.get('latency_ms_mean'), '.1f')} / "
        f"{_fmt(m.get('latency_ms_p95'), '.1f')} |",
    ]
    if steps:
        lines += ["", "| horizon step | " + " | ".join(str(i) for i in steps) + " |",
                  "|---|" + "---|" * len(steps),
                  "| action error | " + " | ".join(_fmt(m[f"action_error_step{i}"], ".4f") for i in steps) + " |"]
    if joints:
        lines += ["", "| channel | error (normalised) | error (robot units) |", "|---|---|---|"]
        lines += [f"| {j} | {_fmt(m.get(f'action_error/{j}'), '.4f')} | {_fmt(m.get(f'action_error_robot/{j}'), '.5f')} |"
                  for j in joints]
    return lines


def _eval_section(metrics: dict) -> list[str]:
    if not isinstance(metrics.get("success_rate"), (int, float)):  # no simulator: the open-loop scores gate
        return ["## Evaluation", "", "No simulator matches this robot: the release was gated on the open-loop "
                "action error (`publish.max_action_error`), from `eval.json`.", "", *_offline_section(metrics)]
    lines = [
        "## Evaluation",
        "",
        "Closed-loop rollouts in simulation (stage `evaluate`, held-out seeds; the gate `publish.min_success`), "
        "from `eval.json`:",
        "",
        "| metric | value |",
        "|---|---|",
        f"| success rate | {_fmt(metrics.get('success_rate'))} (95% Wilson interval "
        f"{_fmt(metrics.get('success_ci_low'))} to {_fmt(metrics.get('success_ci_high'))}) |",
        f"| episodes | {_fmt(metrics.get('episodes'), 'g')} |",
        f"| mean episode length (steps) | {_fmt(metrics.get('mean_episode_length'), '.1f')} |",
        f"| chunk latency, mean / p95 (ms) | {_fmt(metrics.get('latency_ms_mean'), '.1f')} / "
        f"{_fmt(metrics.get('latency_ms_p95'), '.1f')} |",
        f"| control rate (Hz) | {_fmt(metrics.get('control_hz'), '.1f')} |",
    ]
    tasks = _per_task(metrics)
    if tasks:
        lines += ["", "| task | success rate | episodes |", "|---|---|---|"]
        lines += [f"| {task} | {_fmt(m.get('success_rate'))} | {_fmt(m.get('episodes'), 'g')} |"
                  for task, m in tasks.items()]
    offline = _offline_section(metrics)
    return lines + (["", *offline] if offline else [])


def _data_section(demos: dict | None) -> list[str]:
    lines = ["## Training data", ""]
    if not demos:
        return lines + ["Not recorded (no `data/demos/lingbot.json` was given to publish)."]
    source = demos.get("source", {})
    if source.get("repo_id"):
        lines.append(f"- dataset: [`{source['repo_id']}`](https://huggingface.co/datasets/{source['repo_id']}) "
                     f"at revision `{source.get('revision') or 'main'}` (commit `{source.get('commit')}`)")
    else:
        lines.append(f"- dataset: the local LeRobot v3 dataset `{source.get('spec')}` (not on the Hub)")
    lines.append(f"- content fingerprint: `{demos.get('fingerprint')}`")
    if demos.get("robot_type"):
        lines.append(f"- robot: `{demos['robot_type']}`, {demos.get('fps')} fps")
    return lines


def _provenance_section(lock: dict | None, params_text: str | None) -> list[str]:
    lines = ["## Provenance", ""]
    stages = (lock or {}).get("stages", {})
    stages = {name: stage for name, stage in stages.items() if name != "publish"}
    if stages:
        lines += ["The DVC lock hashes of every upstream stage's outputs (`dvc.lock` when this release was made):",
                  "", "| stage | output | md5 |", "|---|---|---|"]
        for name, stage in stages.items():
            for out in stage.get("outs", []):
                lines.append(f"| {name} | `{out.get('path')}` | `{out.get('md5')}` |")
    else:
        lines.append("No `dvc.lock` was given: the upstream stage hashes are not recorded.")
    if params_text:
        lines += ["", "The params (`params.yaml`):", "", "```yaml", params_text.rstrip(), "```"]
    return lines


def _usage_section(repo_id: str, tag: str) -> list[str]:
    return [
        "## Use it",
        "",
        "```bash",
        f"lingbot pull {repo_id}@{tag} --dir policy/   # verifies every file against manifest.json",
        "lingbot serve --policy policy/                 # the websocket policy server, robot side",
        "```",
        "",
        "In LeRobot (`lerobot-eval`, `lerobot-record`), with the plugin `lerobot_policy_lingbot` installed, the "
        "same directory loads like any LeRobot checkpoint: `--policy.path=policy/` (map LeRobot's camera keys "
        "with `--policy.camera_map` when they differ).",
        "",
        "`manifest.json` holds the sha256 and size of every file; `lingbot pull` refuses a mismatch, a missing "
        "or an extra file. Weights are safetensors, everything else JSON: loading never unpickles.",
    ]


def build_card(repo_id: str, tag: str, bundle_meta: dict, metrics: dict, demos: dict | None,
               lock: dict | None, params_text: str | None, files: dict[str, dict]) -> str:
    """README.md text of a release."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from lingbot.sim.suite import is_aloha

    tasks = _per_task(metrics)
    eval_results = [
        EvalResult(task_type="robotics", task_name="Robot manipulation",
                   dataset_type="aloha" if is_aloha(task) else "metaworld",
                   dataset_name=f"{'ALOHA' if is_aloha(task) else 'MetaWorld'} {task} (simulation)",
                   dataset_config=task, metric_type="success_rate", metric_name="Success rate",
                   metric_value=round(float(m["success_rate"]), 4))
        for task, m in tasks.items() if isinstance(m.get("success_rate"), (int, float))
    ]
    if not eval_results and isinstance(metrics.get("success_rate"), (int, float)):
        eval_results.append(EvalResult(task_type="robotics", task_name="Robot manipulation",
                                       dataset_type="metaworld", dataset_name="MetaWorld (simulation)",
                                       metric_type="success_rate", metric_name="Success rate",
                                       metric_value=round(float(metrics["success_rate"]), 4)))
    source = (demos or {}).get("source", {})
    data = ModelCardData(
        library_name="lingbot",
        pipeline_tag="robotics",
        tags=TAGS,
        datasets=[source["repo_id"]] if source.get("repo_id") else None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
    )
    model = bundle_meta.get("model", {})
    tasks_text = ", ".join(f"`{t}`" for t in bundle_meta.get("tasks", [])) or "n/a"
    body = [
        f"# {repo_id} ({tag})",
        "",
        "A [LingBot-VA](https://arxiv.org/abs/2601.21998) style video-action policy trained with lingbot: an "
        "autoregressive world model that predicts the next chunk of video latents and decodes the actions that "
        "realise it (a video expert and an action expert joined as a Mixture-of-Transformers).",
        "",
        f"- task instructions: {tasks_text}",
        f"- cameras: {', '.join(f'`{c}`' for c in bundle_meta.get('cameras', [])) or 'n/a'}; "
        f"{bundle_meta.get('fps')} fps; {bundle_meta.get('actions_per_chunk')} actions per chunk; "
        f"action dim {bundle_meta.get('action_dim')}",
        f"- world model: video width {model.get('video_width')}, action width {model.get('action_width')}, "
        f"depth {model.get('depth')}, {model.get('heads')} heads of {model.get('head_dim')}",
        f"- text encoder: `{bundle_meta.get('text_encoder')}`",
        "",
        *_eval_section(metrics),
        "",
        *_data_section(demos),
        "",
        *_provenance_section(lock, params_text),
        "",
        *_usage_section(repo_id, tag),
        "",
        "## Files",
        "",
        "| file | bytes |",
        "|---|---|",
        *[f"| `{rel}` | {info['size']} |" for rel, info in sorted(files.items())],
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    return str(card)
