"""Measure lingbot on your own GPU machine, offline, in one command (`.ci/gpu`, docs/GPU.md).

`.ci/gpu prepare` (on the machine that ran `dvc repro`) gathers into one git-ignored folder (`.gpu/`)
what a GPU machine without network lacks, within a size limit (64 MiB by default, the checkout that
travels with it included)::

    .gpu/prepare.json          what is in the folder, what was left out and why, sizes, the run config
    .gpu/wheels/*.whl          pinned packages the GPU image lacks and the steps import (MetaWorld's
                               wheel slimmed to the asset files the evaluated tasks open)
    .gpu/gl/*.deb              the GL loader packages MuJoCo's EGL needs there
    .gpu/inputs/latents/       the latent cache of a completed `dvc repro` (data/latents)
    .gpu/inputs/vae/           its VAE (models/vae)
    .gpu/inputs/demos/         lingbot.json, split.json, stats.json and the dataset's meta/ and data/ tables
    .gpu/inputs/frames/        demo frames (fine-tuning episodes for BC, episodes for a VAE fit) re-encoded
                               as H.264 4:4:4, which OpenCV decodes there (the dataset's AV1 needs PyAV,
                               a 40 MB wheel); frames.json gives the index and the re-encoding's PSNR

`.ci/gpu run` (on the GPU machine) installs the wheels into a temporary site, then runs four steps, each
in its own process with its own time limit, so that one failing or hanging step does not stop the
others. Each step is a thin call into `lingbot.bench`, which a user can also call as library code:

    train     `lingbot.bench.speed.train_mfu`: training throughput of the `base` preset in bf16,
              samples/s, tokens/s, MFU against a measured bf16 matmul peak (batch sizes side by side)
    realtime  `lingbot.bench.speed.latency_modes`: chunk latency of the `paper` preset at LIBERO-like
              shapes, fp32 / bf16 autocast / bf16 weights / bf16 weights with the experts compiled
    vae       `lingbot.bench.budget.vae_for_seconds`: a VAE fit on the carried frames for a fixed time,
              held-out PSNR/SSIM
    policy    `lingbot.bench.budget.policy_for_seconds`: pretrain + finetune of the project's run on one
              GPU (`lingbot.config.on_one_gpu`, the `gpu` preset) for a fixed time, plain BC for the same
              seconds, both evaluated on the same held-out episodes

Each step writes `<step>.json` into the output folder; `summary.json`, `summary.md` (printed last) and
`log.txt` complete it: 7 files. `run --cpu` runs the same code with the `tiny` preset and tiny budgets
on a CPU (tests/test_gpu.py).

Modules: `packages` (the GPU image's inventory, wheels, MetaWorld slimming, GL packages), `frames` (the
re-encoded frames), `prepare` (the folder and its size limit), `steps` (the four steps), `schedule` (the
steps in processes with limits, the summary), `__main__` (the command line).
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = ("train", "realtime", "vae", "policy")


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
