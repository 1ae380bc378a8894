"""What the GPU machine lacks, as files: pinned wheels (MetaWorld's slimmed to what the evaluated tasks
open) and the GL loader packages MuJoCo's EGL needs.

The machine is assumed to run an image with CUDA, torch and the common scientific packages
(`IMAGE_PACKAGES`); whatever the steps import beyond it is carried as wheels for CPython 3.12 on
x86_64 Linux, at the versions `.ci/constraints.txt` pins.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lingbot.errors import LingbotError
from tools.gpu import REPO, mib

# The GPU image's packages (versions where they matter): a CUDA image with torch 2.11 and the common
# scientific and ML stack. A package listed here is not carried, even when its version differs from the
# pin. For another image, list its `pip list` here.
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
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_requirements(wheel: Path) -> list[str]:
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


