"""`.ci/gpu prepare`: one folder with what the GPU machine lacks, within a size limit.

The inputs of a completed `dvc repro` (the latent cache, the VAE, the ingest directory's tables), the
frames re-encoded (`tools.gpu.frames`), the wheels and GL packages (`tools.gpu.packages`), and
prepare.json: what is there, what was left out and why, sizes, the run config. The limit counts the
repository's tracked files too, which travel with the folder; the frames come last and their VAE
training episodes fill what it leaves. Over the limit, nothing is left behind.
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from pathlib import Path

from lingbot.errors import LingbotError
from lingbot.sim.suite import camera_names
from tools.gpu import REPO, mib
from tools.gpu.frames import encode_frames
from tools.gpu.packages import download_gl, download_wheels, slim_metaworld

LIMIT_MIB = 64  # the default limit: the folder and the checkout it travels with


def tree_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


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
