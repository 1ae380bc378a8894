"""The prepared GPU run: every figure lingbot claims beyond a CPU, in one command on a GPU machine.

`.ci/gpu prepare` (here, on the CPU machine) gathers into one git-ignored folder (`.gpu/`) what the GPU
machine lacks, within 64 MiB (what one copy to an offline machine should carry)::

    .gpu/prepare.json          what is in the folder, what was left out and why, sizes, the run config
    .gpu/wheels/*.whl          pinned packages the GPU image lacks and the GPU steps import (MetaWorld's
                               wheel slimmed to the asset files the evaluated tasks open)
    .gpu/gl/*.deb              the GL loader packages MuJoCo's EGL needs there
    .gpu/inputs/latents/       the latent cache of a completed `dvc repro` (data/latents)
    .gpu/inputs/vae/           its VAE (models/vae)
    .gpu/inputs/demos/         lingbot.json, split.json, stats.json and the dataset's meta/ and data/ tables
    .gpu/inputs/frames/        demo frames (fine-tuning episodes for BC, episodes for a VAE fit) re-encoded
                               as H.264 4:4:4, which OpenCV decodes there (the dataset's AV1 needs PyAV,
                               a 40 MB wheel); frames.json gives the index and the re-encoding's PSNR

`.ci/gpu run` (there) installs the wheels into a temporary site, then runs four steps, each in its own
process with its own time limit, so that one failing or hanging step does not stop the others:

    train     training throughput of the `base` preset in bf16: samples/s, tokens/s, MFU against a
              measured bf16 matmul peak (batch sizes side by side)
    realtime  chunk latency of the `paper` preset at LIBERO-like shapes, fp32 / bf16 autocast / bf16
              weights / bf16 weights with the experts torch.compiled, side by side, full and half-way
              video denoising, cache vs recompute, the card
    vae       a VAE fit on the carried frames for a fixed time, held-out PSNR/SSIM
    policy    pretrain + finetune of the `gpu` params set on the carried latents for a fixed time,
              plain BC for the same seconds, both evaluated on the same held-out episodes

Each step writes `<step>.json` into the output folder (`$OUT` there); `summary.json`, `summary.md`
(printed last) and `log.txt` complete it: 7 files. `run --cpu` runs
the same code with the `tiny` preset and tiny budgets on a CPU (tests/test_gpu.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from lingbot.errors import LingbotError
from lingbot.sim.suite import camera_names

REPO = Path(__file__).resolve().parents[1]
LIMIT_MIB = 64  # what one call of the device tool carries: the working tree and the carried paths
STEPS = ("train", "realtime", "vae", "policy")

# The GPU machine's image ('cuda', as KINDS.md listed it on 2026-11-17; versions where a pip list
# showed them). A package listed here is not carried, even when its version differs from the pin.
IMAGE_PACKAGES = {
    "absl-py": None, "accelerate": "1.15.0", "aiofiles": None, "aiohappyeyeballs": None, "aiohttp": None,
    "aiosignal": None, "annotated-doc": None, "anyio": None, "attrs": None, "botorch": "0.18.1", "build": None,
    "certifi": None, "charset-normalizer": None, "chex": None, "click": None, "cloudpickle": None,
    "cmake": None, "colorama": None, "contourpy": None, "coverage": None, "cuda-bindings": None,
    "cuda-core": None, "cuda-pathfinder": None, "cuda-toolkit": None, "cupy-cuda13x": "14.2.0",
    "cycler": None, "cython": None, "diffrax": None, "e3nn": None, "einops": None, "equinox": None,
    "etils": None, "execnet": None, "filelock": None, "flatbuffers": None, "flax": None, "fonttools": None,
    "formulaic": None, "frozenlist": None, "fsspec": None, "gpytorch": "1.15.2", "grpcio": None, "h11": None,
    "h5py": None, "hf-xet": None, "httpcore": None, "httpx": None, "huggingface-hub": "1.33.0",
    "humanize": None, "hypothesis": None, "idna": None, "imageio": None, "iniconfig": None,
    "interface-meta": None, "jax": "0.11.2", "jax-cuda13-pjrt": "0.11.2", "jax-cuda13-plugin": "0.11.2",
    "jaxlib": "0.11.2", "jaxtyping": "0.3.11", "jinja2": None, "joblib": None, "kiwisolver": None,
    "lazy-loader": None, "lightning": None, "lightning-utilities": None, "linear-operator": None,
    "lineax": None, "llvmlite": None, "lxml": None, "markdown": None, "markdown-it-py": None,
    "markupsafe": None, "matplotlib": None, "mdurl": None, "meson": None, "ml-dtypes": None, "mpi4py": None,
    "mpmath": None, "msgpack": None, "multidict": None, "multipledispatch": None, "mypy-extensions": None,
    "nanobind": None, "narwhals": None, "networkx": None, "ninja": None, "numba": None, "numba-cuda": None,
    "numpy": "2.5.2", "numpyro": "0.21.0", "nvidia-cublas": None, "nvidia-cuda-cupti": None,
    "nvidia-cuda-nvrtc": None, "nvidia-cuda-runtime": None, "nvidia-cudnn-cu13": None, "nvidia-cufft": None,
    "nvidia-cufile": None, "nvidia-curand": None, "nvidia-cusolver": None, "nvidia-cusparse": None,
    "nvidia-cusparselt-cu13": None, "nvidia-ml-py": None, "nvidia-nccl-cu13": None, "nvidia-nvjitlink": None,
    "nvidia-nvshmem-cu13": None, "nvidia-nvtx": None, "onnx": "1.23.1", "onnx-ir": "1.0.0",
    "onnxruntime": "1.30.0", "onnxscript": "0.7.2", "opencv-python-headless": None, "optax": None,
    "opt-einsum": None, "opt-einsum-fx": None, "optimistix": None, "orbax-checkpoint": None,
    "packaging": None, "pandas": None, "pathspec": None, "patsy": None, "peft": None, "pillow": None,
    "pip": None, "pluggy": None, "portalocker": None, "prometheus-client": None, "propcache": None,
    "protobuf": None, "psutil": None, "pyarrow": None, "pybind11": None, "py-cpuinfo": None, "pygments": None,
    "pyparsing": None, "pyproject-hooks": None, "pyre-extensions": None, "pytest": None,
    "pytest-benchmark": None, "pytest-cov": None, "pytest-mock": None, "pytest-timeout": None,
    "pytest-xdist": None, "python-dateutil": None, "pytorch-lightning": "2.6.6", "pyyaml": None,
    "regex": None, "requests": None, "rich": None, "sacrebleu": None, "safetensors": "0.8.0",
    "scikit-build-core": None, "scikit-image": None, "scikit-learn": None, "scipy": None, "seaborn": None,
    "sentencepiece": "0.2.2", "sentence-transformers": "6.0.1", "setuptools": None, "shellingham": None,
    "simplejson": None, "six": None, "sortedcontainers": None, "statsmodels": None, "sympy": None,
    "tabulate": None, "tensorboard": None, "tensorboard-data-server": None, "tensorstore": None,
    "threadpoolctl": None, "tifffile": None, "tiktoken": "0.14.0", "timm": None, "tokenizers": "0.23.2",
    "toolz": None, "torch": "2.11.0", "torchaudio": "2.11.0", "torchdiffeq": "0.2.5",
    "torch-geometric": "2.8.0.post1", "torchmetrics": "1.9.0", "torchvision": "0.26.0", "tqdm": None,
    "transformers": "5.17.0", "treescope": None, "triton": "3.6.0", "typer": None, "typing-extensions": None,
    "typing-inspect": None, "urllib3": None, "uvloop": None, "wadler-lindig": None, "werkzeug": None,
    "wheel": None, "wrapt": None, "xarray": None, "xxhash": None, "yarl": None, "zipp": None,
}
# What the GPU steps import beyond the image: the VAE (diffusers) and the rollouts (MetaWorld on
# MuJoCo through gymnasium). Their requirements are followed through the wheels' metadata.
GPU_ROOTS = ("diffusers", "metaworld", "mujoco", "gymnasium")
GL_DEBS = ("libegl1", "libglvnd0", "libopengl0", "libgl1", "libglx0", "libgles2")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64")
MESH_AND_TEXTURE = (".png", ".stl", ".obj", ".msh", ".jpg", ".jpeg")


def norm_name(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def tree_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# ----------------------------------------------------------------------------------------------------
# The run's configuration: the embedded default's params with the GPU's model and budgets.

# The `gpu` params set: the embedded default's chain (its data, tasks, evaluation), with the `base`
# preset's world model (text width and latent channels follow the carried cache) and batches a GPU
# fills. The learning rates are lower than the small CPU model's: a 16-layer, 1024-wide transformer.
GPU_OVERRIDES = {
    "vae": {"batch_size": 16},
    "pretrain": {"batch_size": 32, "lr": 3e-4, "warmup": 20, "checkpoint_every": 100000},
    "finetune": {"batch_size": 32, "lr": 1e-4, "warmup": 10, "checkpoint_every": 100000},
}
CPU_OVERRIDES = {  # the precision follows the hardware (lingbot/hardware.py): fp32 on a CPU without bf16
    "pretrain": {"warmup": 2, "checkpoint_every": 100000},
    "finetune": {"warmup": 2, "checkpoint_every": 100000},
}


def run_config_from(prepared: dict, cpu: bool, extra: dict | None = None):
    """The RunConfig `prepare` recorded (the --from project's params), with the GPU (or CPU) overrides
    and the model the step trains: the base preset's on a GPU, the tiny one on a CPU."""
    from lingbot.config import BASE_MODEL, TINY_MODEL, override, preset

    raw = dict(prepared["params"])
    cfg = override(preset(raw.pop("preset")), raw)
    cfg = override(cfg, CPU_OVERRIDES if cpu else GPU_OVERRIDES)
    model = TINY_MODEL if cpu else BASE_MODEL
    model = dataclasses.replace(model, text_dim=prepared["text_dim"], latent_channels=prepared["z_dim"])
    cfg = dataclasses.replace(cfg, model=model)
    return override(cfg, extra) if extra else cfg


# ----------------------------------------------------------------------------------------------------
# prepare


def _check_inputs(src: Path) -> dict[str, Path]:
    paths = {
        "latents": src / "data" / "latents",
        "vae": src / "models" / "vae",
        "demos": src / "data" / "demos",
    }
    needed = [paths["latents"] / "manifest.json", paths["latents"] / "tasks.safetensors",
              paths["vae"] / "config.json", paths["demos"] / "stats.json", paths["demos"] / "split.json",
              paths["demos"] / "lingbot.json", paths["demos"] / "dataset" / "meta" / "info.json"]
    missing = [str(p.relative_to(src)) for p in needed if not p.is_file()]
    if missing:
        raise LingbotError(f"prepare: {src} lacks {', '.join(missing)}: run `dvc repro` there first "
                           "(or pass --from a project directory holding its outputs)")
    return paths


def _copy_demos(demos: Path, out: Path) -> None:
    """The ingest directory without its videos: the frames travel re-encoded (inputs/frames)."""
    out.mkdir(parents=True)
    for name in ("lingbot.json", "split.json", "stats.json"):
        shutil.copyfile(demos / name, out / name)
    for sub in ("meta", "data"):
        shutil.copytree(demos / "dataset" / sub, out / "dataset" / sub)


def frame_episodes(run_cfg, latents: Path, demos: Path) -> tuple[list[int], list[int], list[int]]:
    """(BC episodes: the fine-tuning demos, VAE held-out episodes, VAE training episodes)."""
    from lingbot.data.latents import open_manifest
    from lingbot.train.loop import select_episodes

    bc = select_episodes(open_manifest(latents), run_cfg.finetune)
    split = json.loads((demos / "split.json").read_text())
    n = run_cfg.vae.eval_episodes
    val = split["val"][:n] or split["train"][:n]
    return bc, val, [e for e in split["train"] if e not in val]


def encode_frames(demos: Path, episodes: list[int], out: Path, crf: int = 8) -> dict:
    """Write `episodes` of every camera as one H.264 4:4:4 file per camera plus frames.json.

    Decoded back here with OpenCV (what the GPU machine has) to measure the re-encoding's PSNR and to
    prove that it decodes."""
    import math

    import av
    import numpy as np

    from lingbot.vae.fit import load_frames, read_demos

    manifest, _, layout = read_demos(demos)
    cameras = list(manifest["keys"]["cameras"])
    out.mkdir(parents=True, exist_ok=True)
    index = {"codec": "h264 yuv444p", "crf": crf, "cameras": {}, "episodes": list(map(int, episodes))}
    se = count = 0
    for c, key in enumerate(cameras):
        clips = load_frames(layout, [key], episodes)
        name = f"camera{c}.mkv"
        with av.open(str(out / name), "w") as container:
            # One thread: x264's output depends on the thread count.
            stream = container.add_stream("libx264", rate=40, options={"crf": str(crf), "preset": "slow",
                                                                     "threads": "1"})
            stream.height, stream.width = clips[0].shape[1:3]
            stream.pix_fmt = "yuv444p"
            for clip in clips:
                for frame in clip:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                        container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        rows, start = [], 0
        for ep, clip in zip(episodes, clips):
            rows.append([int(ep), start, len(clip)])
            start += len(clip)
        index["cameras"][key] = {"file": name, "episodes": rows}
        decoded = decode_video(out / name)
        if len(decoded) != start:
            raise LingbotError(f"prepare: {out / name}: OpenCV decoded {len(decoded)} frames of {start}")
        reference = np.concatenate(clips)
        se += float(((decoded.astype(np.float64) - reference) ** 2).sum())
        count += reference.size
    index["psnr_db_vs_dataset_frames"] = round(10 * math.log10(255**2 / max(se / count, 1e-12)), 2)
    (out / "frames.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def decode_video(path: Path):
    """(N, H, W, 3) uint8 RGB frames of a video, through OpenCV."""
    import cv2
    import numpy as np

    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame[..., ::-1])
    capture.release()
    if not frames:
        raise LingbotError(f"{path}: OpenCV decoded no frames (its FFmpeg lacks the codec?)")
    return np.ascontiguousarray(np.stack(frames))


class FramePack:
    """The carried frames, with `lingbot.vae.fit.load_frames`'s signature (camera-major clips)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.index = json.loads((self.root / "frames.json").read_text())
        self._decoded: dict[str, object] = {}

    @property
    def episodes(self) -> list[int]:
        return list(self.index["episodes"])

    def load_frames(self, layout, cameras: list[str], episodes: list[int]) -> list:
        clips = []
        for key in cameras:
            entry = self.index["cameras"].get(key)
            if entry is None:
                raise LingbotError(f"{self.root}: camera {key!r} not carried")
            if key not in self._decoded:
                self._decoded[key] = decode_video(self.root / entry["file"])
            rows = {ep: (start, n) for ep, start, n in entry["episodes"]}
            for ep in episodes:
                if int(ep) not in rows:
                    raise LingbotError(f"{self.root}: episode {ep} of {key} not carried")
                start, n = rows[int(ep)]
                clips.append(self._decoded[key][start : start + n])
        return clips


def _wheel_requirements(wheel: Path) -> list[str]:
    import re
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    names = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            spec = line.split(":", 1)[1].strip()
            if ";" in spec and "python_version" in spec and "<" in spec.split(";", 1)[1]:
                continue  # backports for older Pythons
            names.append(norm_name(re.split(r"[ <>=!~;\[(]", spec, maxsplit=1)[0]))
    return names


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            pins[norm_name(name)] = version.strip()
    return pins


def download_wheels(out: Path, log) -> tuple[list[str], dict[str, str]]:
    """Wheels of the GPU steps' packages the image lacks, at the pinned versions (PyPI, --no-deps).

    Returns (downloaded names, left out: name -> why)."""
    pins = pinned_versions()
    out.mkdir(parents=True, exist_ok=True)
    wanted, queue, done, unpinned = [], list(GPU_ROOTS), set(), {}
    while queue:
        name = norm_name(queue.pop(0))
        if name in done:
            continue
        done.add(name)
        if name in IMAGE_PACKAGES:
            continue
        if name not in pins:  # required by a wheel, yet neither pinned here nor on the image
            unpinned[name] = "required by a carried wheel, not pinned: not carried (the step may fail)"
            continue
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "--disable-pip-version-check",
               *[a for p in WHEEL_PLATFORMS for a in ("--platform", p)], "-d", str(out), f"{name}=={pins[name]}"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if result.returncode:
            raise LingbotError(f"prepare: pip download {name}=={pins[name]} failed: "
                               f"{(result.stderr.strip().splitlines() or ['?'])[-1]}")
        wheel = next(p for p in out.glob("*.whl") if norm_name(p.name.split("-")[0]) == name)
        wanted.append(name)
        log(f"  wheel {wheel.name} ({mib(wheel.stat().st_size)})")
        queue.extend(_wheel_requirements(wheel))
    left_out = {n: "not imported by the GPU steps" for n in pins if n not in IMAGE_PACKAGES and n not in wanted}
    return wanted, {**left_out, **unpinned}


def assets_opened(tasks: list[str], image_size: int, cameras: list[str]) -> set[str] | None:
    """MetaWorld asset files (paths relative to the package) opened while the tasks' environments are
    built and rendered, traced with strace; None where strace is missing."""
    if shutil.which("strace") is None:
        return None
    import metaworld

    root = Path(metaworld.__file__).resolve().parent
    probe = ("import sys; from lingbot.sim.metaworld import MetaWorldEnv; "
             "[MetaWorldEnv(t, int(sys.argv[1]), tuple(sys.argv[2].split(','))).render() for t in sys.argv[3:]]")
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace"
        subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat,open", "-o", str(trace), sys.executable, "-c",
                        probe, str(image_size), ",".join(cameras), *tasks], check=True, capture_output=True,
                       timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        opened = set()
        for line in trace.read_text().splitlines():
            if '"' in line and "= -1" not in line:
                path = Path(line.split('"')[1])
                try:
                    opened.add(str(path.resolve().relative_to(root)))
                except ValueError:
                    pass
    return opened


def slim_metaworld(wheel: Path, tasks: list[str], image_size: int, cameras: list[str], log) -> None:
    """Rewrite MetaWorld's wheel without the meshes and textures the evaluated tasks never open
    (36 MB of it is textures of other scenes)."""
    import zipfile

    from lingbot.sim.metaworld import MEMORY_TASKS

    scenes = sorted({MEMORY_TASKS[t].scene if t in MEMORY_TASKS else t for t in tasks})
    opened = assets_opened(scenes, image_size, cameras)
    if opened is None:
        log("  metaworld: strace missing, wheel kept whole")
        return
    before = wheel.stat().st_size
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = set()
        for info in src.infolist():
            rel = info.filename.removeprefix("metaworld/")
            if (info.filename.startswith("metaworld/assets/") and info.filename.lower().endswith(MESH_AND_TEXTURE)
                    and rel not in opened):
                dropped.add(info.filename)
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line + "\n" for line in data.decode().splitlines()
                               if line.split(",", 1)[0] not in dropped).encode()
            dst.writestr(info, data)
    # RECORD is written last in a wheel, after every file it could list: the filter above saw them all.
    os.replace(slim, wheel)
    log(f"  metaworld slimmed for {', '.join(scenes)}: {mib(before)} -> {mib(wheel.stat().st_size)} "
        f"({len(dropped)} unopened meshes/textures dropped)")


def download_gl(out: Path) -> list[str]:
    """The GL loader packages (amd64 debs) MuJoCo's EGL needs on the GPU machine."""
    out.mkdir(parents=True, exist_ok=True)
    lists = Path(tempfile.mkdtemp(prefix="lingbot-apt-"))
    (lists / "partial").mkdir()
    opts = ["-oAPT::Architecture=amd64", "-oAPT::Architectures=amd64", f"-oDir::State::Lists={lists}"]
    try:
        subprocess.run(["apt-get", *opts, "update"], check=True, capture_output=True, timeout=300)
        subprocess.run(["apt-get", *opts, "download", *GL_DEBS], check=True, capture_output=True, timeout=300,
                       cwd=out)
    except (subprocess.CalledProcessError, FileNotFoundError, subprocess.TimeoutExpired) as exc:
        raise LingbotError(f"prepare: apt-get download of the GL loaders failed ({exc})") from None
    finally:
        shutil.rmtree(lists, ignore_errors=True)
    return sorted(p.name for p in out.glob("*.deb"))


def repo_bytes() -> int:
    """What travels besides the folder: the repository's tracked files."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return 0
    return sum((REPO / f).stat().st_size for f in files.decode().split("\0") if f and (REPO / f).is_file())


def prepare(src: Path, dest: Path, limit_bytes: int, run_cfg, wheels: bool = True, gl: bool = True,
            vae_episodes: int | None = None, log=print) -> dict:
    """Fill `dest` (replaced) with what the GPU run needs; refuse, leaving nothing, above `limit_bytes`
    (counting the repository's tracked files, which travel with it)."""
    from safetensors import safe_open

    from lingbot.config import to_dict

    src, dest = Path(src).resolve(), Path(dest)
    paths = _check_inputs(src)
    if dest.exists():
        shutil.rmtree(dest)
    inputs = dest / "inputs"
    inputs.mkdir(parents=True)
    left_out: dict[str, str] = {}
    try:
        shutil.copytree(paths["latents"], inputs / "latents")
        shutil.copytree(paths["vae"], inputs / "vae")
        _copy_demos(paths["demos"], inputs / "demos")
        left_out["data/demos/dataset/videos"] = "AV1 needs PyAV there (40 MB): frames travel re-encoded"
        manifest = json.loads((paths["latents"] / "manifest.json").read_text())
        with safe_open(str(paths["latents"] / "tasks.safetensors"), framework="pt") as f:
            text_dim = int(f.get_slice("embeddings").get_shape()[-1])
        eval_tasks = list(run_cfg.evaluate.tasks)
        if wheels:
            names, skipped = download_wheels(dest / "wheels", log)
            left_out.update({f"wheel {n}": why for n, why in sorted(skipped.items())})
            (mw,) = (dest / "wheels").glob("metaworld-*.whl")
            image_size = int(json.loads((paths["demos"] / "lingbot.json").read_text())["shapes"]
                             [manifest["cameras"][0]][0])
            slim_metaworld(mw, eval_tasks, image_size, list(camera_names(manifest["cameras"])), log)
        else:
            left_out["wheels"] = "--no-wheels"
        if gl:
            log(f"  GL loaders: {', '.join(download_gl(dest / 'gl'))}")
        else:
            left_out["GL loaders"] = "--no-gl"

        # The frames come last: their training episodes for a VAE fit fill what the limit leaves.
        bc, val, train = frame_episodes(run_cfg, inputs / "latents", inputs / "demos")
        fixed = sorted(set(bc) | set(val))
        extra = [e for e in train if e not in fixed]
        if vae_episodes is not None:
            extra = extra[:vae_episodes]
        base = repo_bytes() + tree_bytes(dest)
        while True:
            frames_dir = inputs / "frames"
            shutil.rmtree(frames_dir, ignore_errors=True)
            index = encode_frames(paths["demos"], sorted(fixed + extra), frames_dir)
            total = base + tree_bytes(frames_dir)
            if total <= limit_bytes or not extra:
                break
            # Over the limit: halve the VAE's extra training episodes and encode again.
            dropped = extra[len(extra) // 2 :]
            extra = extra[: len(extra) // 2]
            log(f"  frames: {mib(total)} in all is over the limit; {len(dropped)} VAE training episodes fewer")
        left_out_train = [e for e in train if e not in fixed and e not in extra]
        if left_out_train:
            left_out["frames"] = f"{len(left_out_train)} of {len(train)} VAE training episodes (size limit)"
        total = repo_bytes() + tree_bytes(dest)
        if total > limit_bytes:
            raise LingbotError(f"prepare: {dest} would carry {mib(total)} with the repository's "
                               f"{mib(repo_bytes())}, over the {mib(limit_bytes)} limit; refused")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    sizes = {p.name: tree_bytes(p) for p in sorted(dest.iterdir())}
    sizes.update({f"inputs/{p.name}": tree_bytes(p) for p in sorted(inputs.iterdir())})
    record = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "from": str(src),
        "params": to_dict(run_cfg),
        "text_dim": text_dim,
        "z_dim": int(manifest["z_dim"]),
        "cache_fingerprints": manifest["fingerprints"],
        "frames": {"bc_episodes": bc, "vae_val_episodes": val, "vae_train_episodes": [e for e in extra],
                   "psnr_db_vs_dataset_frames": index["psnr_db_vs_dataset_frames"]},
        "wheels": sorted(p.name for p in (dest / "wheels").glob("*.whl")) if wheels else [],
        "bytes": {k: v for k, v in sizes.items()},
        "repository_bytes": repo_bytes(),
        "total_bytes": repo_bytes() + tree_bytes(dest),
        "limit_bytes": limit_bytes,
        "left_out": left_out,
    }
    (dest / "prepare.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


# ----------------------------------------------------------------------------------------------------
# The steps. Each runs in its own process (`python -m lingbot.gpu_run step NAME ...`) and writes its
# JSON as it goes, so a step stopped at its limit still returns what it had measured.


class StepResult:
    def __init__(self, path: Path, name: str):
        self.path, self.data = Path(path), {"step": name, "status": "running"}
        self.save()

    def update(self, **values) -> None:
        self.data.update(values)
        self.save()

    def save(self) -> None:
        from lingbot.fsutil import write_json

        write_json(self.path, self.data)


def device_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info.update(device="cpu", threads=torch.get_num_threads())
    return info


def measure_matmul_peak(device, n: int, dtype, repeats: int = 10) -> float:
    """Dense matmul rate (FLOP/s) on random data: the median of `repeats` timed products after warm-ups."""
    import statistics

    import torch

    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def step_train(result: StepResult, args, prepared: dict) -> None:
    """Training throughput of the base preset (tiny on a CPU) at several batch sizes, MFU against the
    measured matmul peak of the same dtype."""
    import torch

    from lingbot.bench.speed import train_throughput
    from lingbot.config import preset

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # the training's matmul dtype
    peak = measure_matmul_peak(device, 8192 if cuda else 512, dtype)
    result.update(**device_info(), peak_dtype=str(dtype).removeprefix("torch."),
                  peak_tflops=round(peak / 1e12, 2), variants={})
    name = "tiny" if args.cpu else "base"
    for batch in (args.batches or ([8] if args.cpu else [8, 32, 128])):
        try:
            r = train_throughput(preset(name), batch, 2 if args.cpu else 10, device, latent_hw=4 if args.cpu else 8)
            r["mfu"] = round(r["tflops"] * 1e12 / peak, 4)
        except Exception as exc:  # one variant's failure (out of memory, say) leaves the others
            r = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        if cuda:
            torch.cuda.empty_cache()
        result.data["variants"][f"{name}-b{batch}"] = r
        result.save()
    ok = [v for v in result.data["variants"].values() if "mfu" in v]
    if not ok:
        raise RuntimeError("no training variant ran")
    best = max(ok, key=lambda v: v["mfu"])
    result.update(preset=name, best_mfu=best["mfu"], best_samples_per_s=best["samples_per_s"],
                  best_tokens_per_s=best["tokens_per_s"], best_batch=best["batch_size"])


def step_realtime(result: StepResult, args, prepared: dict) -> None:
    """The paper preset's chunk latency at LIBERO-like shapes on CUDA (tiny shapes on a CPU)."""
    import torch

    from lingbot.bench.speed import chunk_latency
    from lingbot.config import preset
    from lingbot.model.world_model import WorldModel, compile_experts, count_parameters

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    run_cfg = preset("tiny" if args.cpu else "paper")
    # LIBERO: 128x128 images, 2 cameras; Wan2.2's VAE (16x) gives 8x8 latents. The model holds one latent
    # frame per chunk, so the paper's 4 latent frames of 2 cameras enter as 8 camera slots: the same
    # 8 x 16 video tokens and 16 action tokens per chunk, the same attention and FLOPs.
    frames, cams = (1, 2) if args.cpu else (4, 2)
    latent_hw, K = (4, 4) if args.cpu else (8, 16)
    window = 3 if args.cpu else 30
    policy_cfg = dataclasses.replace(run_cfg.policy, history_chunks=window,
                                     action_steps=args.action_steps or (2 if args.cpu else 50))
    histories = (1, window)
    diff_history = 2 if args.cpu else 4
    result.update(**device_info(), preset=run_cfg.preset, cameras=cams, latent_frames_per_chunk=frames,
                  latent_hw=latent_hw, actions_per_chunk=K, window_chunks=window,
                  video_steps=policy_cfg.video_steps, action_steps=policy_cfg.action_steps,
                  tokens_per_chunk=frames * cams * (latent_hw // 2) ** 2 + K, variants={})
    torch.manual_seed(0)
    with torch.device(device):  # the paper's ~5B parameters are initialised where they run
        model = WorldModel(run_cfg.model, cameras=frames * cams, actions_per_chunk=K).eval()
    for head in (model.video_out, model.action_out, model.state_in):  # trained heads are not zero
        if head is not None:
            torch.nn.init.normal_(head.weight, std=0.02)
    result.update(params=count_parameters(model))
    reference = None
    for mode in args.modes or ("fp32", "bf16-autocast", "bf16-weights", "bf16-compile"):
        try:
            if mode in ("bf16-weights", "bf16-compile"):
                model.to(torch.bfloat16)
            if mode == "bf16-compile":  # on a CPU only traced (backend eager): the wiring, not the speed
                compile_experts(model, backend="eager" if not cuda else "inductor")
                t0 = time.perf_counter()
                chunk_latency(model, run_cfg, policy_cfg, mode, frames * cams, latent_hw, histories, 1,
                              diff_history, device)  # compiles every shape the timed pass meets
                compile_s = round(time.perf_counter() - t0, 1)
            r = chunk_latency(model, run_cfg, policy_cfg, mode, frames * cams, latent_hw, histories,
                                 args.repeats or (2 if args.cpu else 3), diff_history, device, reference)
            if mode == "bf16-compile":
                r["compile_s"] = compile_s
            if mode == "fp32":
                reference = r.get("_actions")
            r.pop("_actions", None)
            if cuda:
                r["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except Exception as exc:
            r = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        result.data["variants"][mode] = r
        ok = {m: v for m, v in result.data["variants"].items() if f"latency_ms_hist{window}" in v}
        if ok:  # the best so far, saved with each variant: a step stopped at its limit keeps it
            best = min(ok, key=lambda m: ok[m][f"latency_ms_hist{window}"])
            result.update(best_mode=best, best_latency_ms=ok[best][f"latency_ms_hist{window}"],
                          best_latency_ms_half_video=ok[best]["latency_ms_half_video_denoise"])
        result.save()
    if "best_mode" not in result.data:
        raise RuntimeError("no realtime variant ran")


def _work_demos(inputs: Path, work: Path, train: list[int], val: list[int]) -> Path:
    """An ingest directory whose split holds the carried episodes (fit_vae trains on split['train'])."""
    demos = work / "demos"
    if demos.exists():
        shutil.rmtree(demos)
    demos.mkdir(parents=True)
    for name in ("lingbot.json", "stats.json"):
        shutil.copyfile(inputs / "demos" / name, demos / name)
    (demos / "dataset").symlink_to((inputs / "demos" / "dataset").resolve())
    (demos / "split.json").write_text(json.dumps({"train": train, "val": val}))
    return demos


def step_vae(result: StepResult, args, prepared: dict) -> None:
    """A VAE fit on the carried frames for a fixed time: steps set from a measured step time."""
    import torch

    from lingbot.hardware import resolve_precision
    from lingbot.vae import fit
    from lingbot.vae.wan import build_vae

    inputs, work = Path(args.inputs), Path(args.work)
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    cfg = run_config_from(prepared, args.cpu).vae
    frames = prepared["frames"]
    pack = FramePack(inputs / "frames")
    train_eps = sorted(set(frames["vae_train_episodes"]) | set(frames["bc_episodes"]))
    val = frames["vae_val_episodes"]
    demos = _work_demos(inputs, work, [e for e in train_eps if e not in val], val)
    result.update(**device_info(), config=dataclasses.asdict(cfg), train_episodes=len(train_eps) - len(
        set(train_eps) & set(val)), val_episodes=len(val), seconds_budget=args.seconds,
        frames_psnr_db_vs_dataset=frames["psnr_db_vs_dataset_frames"])
    t0 = time.perf_counter()
    manifest, split, layout = fit.read_demos(demos)
    clips = pack.load_frames(layout, manifest["keys"]["cameras"], split["train"])
    vae = build_vae(cfg).to(device)
    warm, timed = (1, 1) if args.cpu else (3, 10)
    precision = resolve_precision(cfg.precision, device, "fit_vae")  # as fit_vae resolves it
    fit.train(vae, clips, dataclasses.replace(cfg, steps=warm), progress=False, precision=precision)
    t1 = time.perf_counter()
    fit.train(vae, clips, dataclasses.replace(cfg, steps=timed), progress=False, precision=precision)
    per_step = (time.perf_counter() - t1) / timed
    reserve = 5 if args.cpu else 20  # held-out scoring, latent statistics, save
    steps = max(1, int((args.seconds - (time.perf_counter() - t0) - reserve) / per_step))
    if args.cpu:  # a loaded 2-core CPU's step times are noise: the path is exercised, not the budget
        steps = min(steps, 3)
    result.update(seconds_per_step=round(per_step, 4), steps_planned=steps)
    report = fit.fit_vae(dataclasses.replace(cfg, steps=steps), demos, work / "vae", progress=False,
                         device=device, frames=pack.load_frames)
    result.update(**{k: report[k] for k in ("psnr_db", "ssim", "eval_frames", "params", "z_dim", "steps",
                                            "train_clips", "machine")},
                  fit_seconds=report["seconds"], reached_28db=report["psnr_db"] >= 28.0)


def load_policy_cuda(path):
    """`evaluate`'s loader for a world-model bundle on the GPU (module level: worker processes import it)."""
    from lingbot.policy.runtime import load_policy

    return load_policy(path, device="cuda", dtype="auto")  # bf16 weights where the GPU has bf16, as served


def _time_train(cfg, model_cfg, latents: Path, work: Path, steps: tuple[int, int], device=None) -> float:
    """Seconds per optimizer step of `train`: two short runs, so start-up and the final save cancel.
    Where noise makes the difference implausible (a loaded CPU), the longer run's mean step, which
    counts its start-up and save too: fewer steps, never a run past its budget."""
    from lingbot.train.loop import train

    walls = []
    for n in steps:
        out = work / f"calibrate-{n}"
        t0 = time.perf_counter()
        train(dataclasses.replace(cfg, steps=n), model_cfg, latents, out, progress=False, device=device)
        walls.append(time.perf_counter() - t0)
        shutil.rmtree(out, ignore_errors=True)
    difference = (walls[1] - walls[0]) / (steps[1] - steps[0])
    mean = walls[1] / steps[1]
    return difference if difference > 0.25 * mean else mean


def step_policy(result: StepResult, args, prepared: dict) -> None:
    """Pretrain + finetune the world model for a fixed time, plain BC for as long, evaluate both."""
    import concurrent.futures

    import numpy as np
    import torch

    from lingbot.baselines.bc import BCConfig, load_bc, load_demos, save_bc, train_bc
    from lingbot.policy.bundle import write_bundle
    from lingbot.sim.evaluate import evaluate
    from lingbot.train.loop import train

    inputs, work = Path(args.inputs), Path(args.work)
    latents, vae = inputs / "latents", inputs / "vae"
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    cfg = run_config_from(prepared, args.cpu, json.loads(args.override) if args.override else None)
    train_seconds = args.train_seconds or (6 if args.cpu else 50)
    episodes = args.episodes or cfg.evaluate.episodes
    workers = args.workers or (2 if args.cpu else max(2, os.cpu_count() or 2))
    eval_cfg = dataclasses.replace(cfg.evaluate, episodes=episodes, videos=0, workers=workers)
    result.update(**device_info(), model=dataclasses.asdict(cfg.model), pretrain=dataclasses.asdict(cfg.pretrain),
                  finetune=dataclasses.asdict(cfg.finetune), tasks=list(eval_cfg.tasks), episodes_per_task=episodes,
                  eval_seed=eval_cfg.seed, train_seconds_budget=train_seconds)

    # World model: steps from a measured step time, 60% of the seconds pretraining, 40% fine-tuning.
    per_step = _time_train(cfg.pretrain, cfg.model, latents, work, (1, 3) if args.cpu else (2, 8), device)
    cap = 20 if args.cpu else 10**6  # a CPU run exercises the path; its step times are noise
    pre_steps = min(cap, max(2, int(0.6 * train_seconds / per_step)))
    fine_steps = min(cap, max(2, int(0.4 * train_seconds / per_step)))
    result.update(world_model_seconds_per_step=round(per_step, 4), pretrain_steps=pre_steps, finetune_steps=fine_steps)
    t0 = time.perf_counter()
    pre = train(dataclasses.replace(cfg.pretrain, steps=pre_steps), cfg.model, latents, work / "pretrain",
                progress=False, device=device)
    fine = train(dataclasses.replace(cfg.finetune, steps=fine_steps), cfg.model, latents, work / "finetune",
                 init_from=work / "pretrain" / "checkpoint", progress=False, device=device)
    wm_seconds = time.perf_counter() - t0
    write_bundle(work / "policy", work / "finetune" / "checkpoint", vae, latents, cfg.policy)
    result.update(world_model_train_wall_s=round(wm_seconds, 1),
                  world_model_step_seconds=round((pre_steps * cfg.pretrain.batch_size / pre["samples_per_s"])
                                                 + (fine_steps * cfg.finetune.batch_size / fine["samples_per_s"]), 1),
                  pretrain_final_loss=pre["final_loss"], finetune_final_loss=fine["final_loss"],
                  finetune_final_action_loss=fine["final_action_loss"], params_video=pre["params_video"],
                  params_action=pre["params_action"])

    # Plain BC on the same fine-tuning demos, for the world model's training seconds.
    pack = FramePack(inputs / "frames")
    bc_cfg = BCConfig()
    data = load_demos(inputs / "demos", latents, cfg.finetune, bc_cfg.chunk, frames=pack.load_frames)
    calib = 3 if args.cpu else 20
    _, _, seconds = train_bc(data, dataclasses.replace(bc_cfg, steps=calib), False, device)
    bc_steps = min(cap, max(2, int(train_seconds / (seconds / calib))))
    model, losses, bc_seconds = train_bc(data, dataclasses.replace(bc_cfg, steps=bc_steps), False, device)
    save_bc(model, data, dataclasses.replace(bc_cfg, steps=bc_steps), work / "bc")
    result.update(bc_steps=bc_steps, bc_train_s=round(bc_seconds, 1), bc_final_loss=round(float(np.mean(losses[-50:])), 4),
                  bc_train_episodes=len(data["episodes"]))

    # Both evaluated at once on the same held-out episodes: the world model's rollouts get two thirds of
    # the workers (its policy runs on the GPU), BC's the rest (its small network runs on the CPU).
    wm_workers = max(1, (2 * workers) // 3)
    bc_workers = max(1, workers - wm_workers)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        wm = pool.submit(evaluate, work / "policy", dataclasses.replace(eval_cfg, workers=wm_workers),
                         work / "eval-world-model", False, load_policy_cuda if cuda else None)
        bc = pool.submit(evaluate, work / "bc", dataclasses.replace(eval_cfg, workers=bc_workers),
                         work / "eval-bc", False, load_bc)
        for name, future in (("world_model", wm), ("bc", bc)):
            try:
                summary = future.result()
                result.update(**{f"{name}_{k.replace('/', '_')}": v for k, v in summary.items()})
            except Exception as exc:
                result.update(**{f"{name}_eval_error": f"{type(exc).__name__}: {exc}"[:500]})
    result.update(eval_wall_s=round(time.perf_counter() - t0, 1))
    if "world_model_success_rate" not in result.data or "bc_success_rate" not in result.data:
        raise RuntimeError("an evaluation failed: " + str(result.data.get("world_model_eval_error")
                                                          or result.data.get("bc_eval_error")))


STEP_FUNCTIONS = {"train": step_train, "realtime": step_realtime, "vae": step_vae, "policy": step_policy}


def run_step(args) -> int:
    result = StepResult(Path(args.result), args.name)
    t0 = time.perf_counter()
    try:
        import torch

        if args.cpu:
            torch.set_num_threads(2)
        prepared = json.loads((Path(args.inputs).parent / "prepare.json").read_text())
        Path(args.work).mkdir(parents=True, exist_ok=True)
        STEP_FUNCTIONS[args.name](result, args, prepared)
        result.update(status="ok", seconds=round(time.perf_counter() - t0, 1))
        return 0
    except BaseException as exc:
        result.update(status="failed", seconds=round(time.perf_counter() - t0, 1),
                      error=f"{type(exc).__name__}: {exc}"[:1000], traceback=traceback.format_exc()[-3000:])
        print(traceback.format_exc(), file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------------------------------
# run: the steps in order, each in its own process with its own limit, inside a total budget.

GPU_LIMITS = {"train": 50, "realtime": 110, "vae": 120, "policy": 240}
CPU_LIMITS = {"train": 60, "realtime": 60, "vae": 90, "policy": 150}
# Seconds of each step's limit it spends on its fixed-time work (the rest is start-up and scoring).
GPU_WORK_SECONDS = {"vae": 95}
CPU_WORK_SECONDS = {"vae": 25}


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def _headline(name: str, r: dict) -> str:
    """One line of the summary table: the step's figures that answer the issue."""
    if r.get("status") != "ok" and not any(k.startswith(("best", "psnr", "world_model_success")) for k in r):
        return (r.get("error") or r.get("status", "?")).splitlines()[0][:120]
    if name == "train":
        return (f"{r.get('device')}: best MFU {r.get('best_mfu')} at batch {r.get('best_batch')} "
                f"({r.get('best_samples_per_s')} samples/s, {r.get('best_tokens_per_s')} tokens/s; "
                f"peak {r.get('peak_tflops')} TFLOP/s {r.get('peak_dtype')} measured)")
    if name == "realtime":
        v = r.get("variants", {}).get(r.get("best_mode"), {})
        return (f"{r.get('device')}: {r.get('best_latency_ms')} ms/chunk ({r.get('best_mode')}, "
                f"{r.get('window_chunks')}-chunk window; half-way video {r.get('best_latency_ms_half_video')} ms); "
                f"cache vs recompute {v.get('cache_vs_recompute_max_abs_diff_actions')}")
    if name == "vae":
        return (f"held-out PSNR {r.get('psnr_db')} dB, SSIM {r.get('ssim')} after {r.get('steps')} steps "
                f"({r.get('fit_seconds')} s; >= 28 dB: {r.get('reached_28db')})")
    if name == "policy":
        def rate(who):
            k = r.get(f"{who}_success_rate")
            if k is None:
                return "n/a"
            n = r.get(f"{who}_episodes")
            return f"{round(k * n)}/{n} [{r.get(f'{who}_success_ci_low')}, {r.get(f'{who}_success_ci_high')}]"
        return (f"world model {rate('world_model')} vs BC {rate('bc')} "
                f"(each {r.get('train_seconds_budget')} s of training; {', '.join(r.get('tasks', []))})")
    return ""


def run(out: Path, gpu_dir: Path, cpu: bool, limits: dict[str, float], total: float, only: list[str],
        step_args: list[str], install_note: str | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    inputs = gpu_dir / "inputs"
    if not (gpu_dir / "prepare.json").is_file():
        raise LingbotError(f"run: {gpu_dir / 'prepare.json'} missing: run `.ci/gpu prepare` first")
    work = Path(tempfile.mkdtemp(prefix="lingbot-gpu-run-"))
    deadline = time.monotonic() + total
    log_lines = []
    summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
               "mode": "cpu" if cpu else "gpu", "install": install_note, "steps": {}}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
           "PYOPENGL_PLATFORM": os.environ.get("PYOPENGL_PLATFORM", "egl")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    work_seconds = CPU_WORK_SECONDS if cpu else GPU_WORK_SECONDS
    for name in STEPS:
        if only and name not in only:
            continue
        path = out / f"{name}.json"
        left = deadline - time.monotonic()
        limit = min(limits[name], left)
        if limit < 1:
            data = {"step": name, "status": "skipped", "error": "no time left in the run's total budget"}
            path.write_text(json.dumps(data, indent=2) + "\n")
            summary["steps"][name] = data
            continue
        cmd = [sys.executable, "-m", "lingbot.gpu_run", "step", name, "--inputs", str(inputs),
               "--work", str(work / name), "--result", str(path), *step_args]
        if cpu:
            cmd.append("--cpu")
        if name in work_seconds:
            cmd += ["--seconds", str(min(work_seconds[name], max(1.0, limit - (limits[name] - work_seconds[name]))))]
        print(f"gpu run: {name} (limit {limit:.0f} s)", flush=True)
        t0 = time.monotonic()
        with open(work / f"{name}.log", "w") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
                status = None
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the step and the workers it started
                proc.wait()
                rc, status = None, "timeout"
        wall = round(time.monotonic() - t0, 1)
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            data = {"step": name}
        tail = (work / f"{name}.log").read_text(errors="replace")[-4000:]
        if status == "timeout":
            data.update(status="timeout", error=f"stopped at its {limit:.0f} s limit")
        elif rc != 0 and data.get("status") != "failed":
            data.update(status="failed", error=f"exit code {rc}: " + (tail.strip().splitlines() or ["?"])[-1])
        data.update(wall_s=wall, limit_s=round(limit, 1))
        path.write_text(json.dumps(data, indent=2) + "\n")
        summary["steps"][name] = data
        log_lines.append(f"===== {name}: {data.get('status')} in {wall} s\n{tail}\n")
        print(f"gpu run: {name} {data.get('status')} in {wall} s", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    rows = [(name, data.get("status", "?"), data.get("wall_s", ""), _headline(name, data))
            for name, data in summary["steps"].items()]
    table = ["| step | status | wall s | figures |", "| --- | --- | --- | --- |"]
    table += [f"| {n} | {s} | {w} | {h} |" for n, s, w, h in rows]
    device = next((d.get("device") for d in summary["steps"].values() if d.get("device")), "?")
    text = (f"# lingbot GPU run, {summary['date']}, commit {summary['commit']}{' (dirty)' if summary['dirty'] else ''}, "
            f"{device}, mode {summary['mode']}\n\n" + "\n".join(table) + "\n")
    summary["table"], summary["device"] = text, device
    (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "steps"}
                                                 | {"steps": {n: {k: d.get(k) for k in ("status", "wall_s", "error")}
                                                              for n, d in summary["steps"].items()}}, indent=2) + "\n")
    (out / "log.txt").write_text("".join(log_lines)[-2_000_000:])
    (out / "summary.md").write_text(text)
    print(text, flush=True)
    return summary


# ----------------------------------------------------------------------------------------------------
# command line


def _limits(pairs: list[str], cpu: bool) -> dict[str, float]:
    limits = dict(CPU_LIMITS if cpu else GPU_LIMITS)
    for pair in pairs or []:
        name, _, value = pair.partition("=")
        if name not in limits:
            raise LingbotError(f"--limit {pair!r}: unknown step (steps: {', '.join(STEPS)})")
        limits[name] = float(value)
    return limits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=".ci/gpu", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="gather what the GPU machine lacks into one folder (here)")
    p.add_argument("--from", dest="src", default=".", help="project directory with a completed `dvc repro`")
    p.add_argument("--dir", default=str(REPO / ".gpu"), help="folder to fill (replaced; default .gpu)")
    p.add_argument("--params", help="params.yaml of the run (default: --from's params.yaml)")
    p.add_argument("--preset", help="a named preset instead of a params file (tests: tiny)")
    p.add_argument("--limit-mib", type=float, default=LIMIT_MIB, help="refuse above this, repository included")
    p.add_argument("--no-wheels", action="store_true", help="carry no wheels (no PyPI access; tests)")
    p.add_argument("--no-gl", action="store_true", help="carry no GL loader packages (tests)")
    p.add_argument("--vae-episodes", type=int, help="at most this many extra training episodes of frames")
    p = sub.add_parser("run", help="run the steps (there; --cpu: here, tiny)")
    p.add_argument("--cpu", action="store_true", help="tiny preset and budgets on this CPU")
    p.add_argument("--dir", default=str(REPO / ".gpu"), help="the prepared folder (default .gpu)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-out", help="output folder (default $OUT)")
    p.add_argument("--total", type=float, help="total seconds for all steps (default 520 GPU, 330 CPU)")
    p.add_argument("--limit", action="append", metavar="STEP=SECONDS", help="a step's time limit (repeatable)")
    p.add_argument("--only", action="append", choices=STEPS, help="run only this step (repeatable)")
    p.add_argument("--install-note", help="(from .ci/gpu) how the wheel install went")
    p.add_argument("--train-seconds", type=float, help="policy: world-model (and BC) training seconds")
    p.add_argument("--episodes", type=int, help="policy: evaluation episodes per task")
    p.add_argument("--override", help='policy: JSON overrides of the run config, e.g. {"pretrain": {"lr": 1e-4}}')
    p = sub.add_parser("step", help="(internal) one step, in its own process")
    p.add_argument("name", choices=STEPS)
    p.add_argument("--inputs", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--seconds", type=float, default=100.0)
    p.add_argument("--train-seconds", type=float)
    p.add_argument("--episodes", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--override")
    p.add_argument("--batches", type=int, nargs="*")
    p.add_argument("--modes", nargs="*")
    p.add_argument("--repeats", type=int)
    p.add_argument("--action-steps", type=int)
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            from lingbot.config import load_run_config, preset

            src = Path(args.src)
            if args.preset:
                run_cfg = preset(args.preset)
            else:
                params = Path(args.params) if args.params else src / "params.yaml"
                run_cfg = load_run_config(params if params.is_file() else REPO / "params.yaml")
            t0 = time.perf_counter()
            record = prepare(src, Path(args.dir), int(args.limit_mib * 2**20), run_cfg, wheels=not args.no_wheels,
                             gl=not args.no_gl, vae_episodes=args.vae_episodes)
            for name, size in record["bytes"].items():
                print(f"  {name:<16} {mib(size)}")
            unused = [w.removeprefix("wheel ") for w, why in record["left_out"].items()
                      if w.startswith("wheel ") and why == "not imported by the GPU steps"]
            for what, why in record["left_out"].items():
                if what.removeprefix("wheel ") not in unused:
                    print(f"  left out: {what}: {why}")
            if unused:
                print(f"  left out, not imported by the GPU steps: {len(unused)} pinned packages the image lacks "
                      f"({', '.join(unused)})")
            print(f"prepare: {args.dir}: {mib(record['total_bytes'])} with the repository's "
                  f"{mib(record['repository_bytes'])} (limit {mib(record['limit_bytes'])}) in "
                  f"{time.perf_counter() - t0:.0f} s")
            return 0
        if args.command == "step":
            return run_step(args)
        step_args = []
        for flag in ("train_seconds", "episodes", "override"):
            if getattr(args, flag) is not None:
                step_args += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        summary = run(Path(args.out), Path(args.dir), args.cpu, _limits(args.limit, args.cpu),
                      args.total or (330 if args.cpu else 520), args.only or [], step_args, args.install_note)
        return 0 if all(d.get("status") == "ok" for d in summary["steps"].values()) else 1
    except LingbotError as exc:
        print(f"gpu: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
