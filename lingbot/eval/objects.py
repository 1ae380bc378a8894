"""What a video VAE keeps of the objects: PSNR in a small box around each object's projection.

PSNR over a whole 64x64 frame is mostly a static table: a VAE that drops a 2-3 pixel puck loses a few
hundredths of a dB there. MetaWorld knows where the task's object and goal are (collect records them as
`observation.environment_state`); projected into each fixed camera, a box of BOX_FRACTION of the image
around each point is scored on its own, on the held-out episodes' reconstructions. Moving cameras (the
wrist view) are left out: where an object lies in them needs the camera's pose per frame.
"""

from __future__ import annotations

import functools

import numpy as np

BOX_FRACTION = 0.1  # box side as a fraction of the image side (7 px at 64x64)
POINTS = ("object", "goal")  # observation.environment_state: object xyz, goal xyz


@functools.lru_cache(maxsize=None)
def camera_projection(task: str, camera: str, image_size: int) -> np.ndarray | None:
    """(3, 4) pinhole matrix of a fixed MetaWorld camera (pixel column, row, 1 ~ P @ [x, y, z, 1]) in the
    image as lingbot records it (corner cameras turned upright); None for a camera that moves."""
    from lingbot.sim.metaworld import ROTATED_CAMERAS, MetaWorldEnv  # first: it picks headless GL

    import mujoco

    env = MetaWorldEnv(task, image_size, (camera,))
    try:
        model, data = env.env.model, env.env.data
        cam = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if model.cam_bodyid[cam] != 0:
            return None
        mujoco.mj_forward(model, data)
        position, rotation = data.cam_xpos[cam].copy(), data.cam_xmat[cam].reshape(3, 3).copy()
        focal = image_size / 2 / np.tan(np.deg2rad(model.cam_fovy[cam]) / 2)
    finally:
        env.close()
    # MuJoCo's camera looks down its -z axis, x right, y up; image rows run downwards.
    to_camera = np.concatenate([rotation.T, -rotation.T @ position[:, None]], axis=1)  # world -> camera
    c = (image_size - 1) / 2
    intrinsics = np.array([[focal, 0, -c], [0, -focal, -c], [0, 0, -1.0]])
    if camera in ROTATED_CAMERAS:  # recorded turned by 180 degrees: (col, row) -> (S-1-col, S-1-row)
        intrinsics = np.array([[-1, 0, image_size - 1], [0, -1, image_size - 1], [0, 0, 1.0]]) @ intrinsics
    return intrinsics @ to_camera


def project(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 3) world points -> (N, 2) pixel (column, row)."""
    h = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ matrix.T
    return h[:, :2] / h[:, 2:3]


def box_side(image_size: int) -> int:
    """The scored box's side in pixels (odd: centred on the point's pixel)."""
    return 2 * max(1, round(BOX_FRACTION * image_size / 2)) + 1


def box_masks(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """(T, 2) pixel centres -> (T, S, S) bool masks of a BOX_FRACTION box around each (clipped to the image)."""
    half = box_side(image_size) // 2
    grid = np.arange(image_size)
    col, row = np.round(pixels[:, 0]).astype(int), np.round(pixels[:, 1]).astype(int)
    cols = np.abs(grid[None, :] - col[:, None]) <= half
    rows = np.abs(grid[None, :] - row[:, None]) <= half
    return rows[:, :, None] & cols[:, None, :]


def point_pixels(matrix: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """{point: (T, 2) pixel (column, row)} of each of POINTS, from (T, 3 * len(POINTS)) world positions per
    frame (`observation.environment_state`) seen through the camera `matrix`."""
    return {name: project(matrix, positions[:, 3 * i : 3 * i + 3]) for i, name in enumerate(POINTS)}


def point_masks(matrix: np.ndarray, positions: np.ndarray, image_size: int) -> dict[str, np.ndarray]:
    """{point: (T, S, S) box masks} of each of POINTS (positions as `point_pixels` takes them)."""
    return {name: box_masks(pixels, image_size) for name, pixels in point_pixels(matrix, positions).items()}


def box_psnr(original: np.ndarray, reconstruction: np.ndarray, masks: np.ndarray) -> float:
    """PSNR (dB, 8-bit peak) of (T, S, S, 3) uint8 frames over the masked pixels only."""
    err = (original.astype(np.float64) - reconstruction.astype(np.float64)) ** 2
    mse = err[masks].mean() if masks.any() else 0.0
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _scene(demos):
    """(manifest, split, layout, {episode: MetaWorld task}, {episode: (T, 3 * len(POINTS)) world positions})
    of an ingest directory whose dataset records `observation.environment_state`."""
    from pathlib import Path

    from lingbot.data.lerobot_io import episode_tasks, read_frames
    from lingbot.errors import LingbotError
    from lingbot.sim.metaworld import task_description, task_names
    from lingbot.vae.fit import read_demos

    manifest, split, layout = read_demos(Path(demos))
    key = "observation.environment_state"
    if key not in layout.features:
        raise LingbotError(f"{Path(demos) / 'dataset'}: no {key!r} column (where the objects are): "
                           "collect the demos with lingbot's MetaWorld collection")
    by_instruction = {task_description(t): t for t in task_names()}
    tasks = {}
    for ep, text in episode_tasks(layout).items():
        if text not in by_instruction:
            raise LingbotError(f"episode {ep}: task {text!r} is not a MetaWorld task lingbot knows")
        tasks[ep] = by_instruction[text]
    table = read_frames(layout, ["episode_index", key])
    index = table.column("episode_index").to_numpy()
    positions = np.asarray(table.column(key).to_pylist(), np.float64)
    return manifest, split, layout, tasks, {ep: positions[index == ep] for ep in np.unique(index).tolist()}


def score_vae_objects(demos, vae_dir, episodes: int = 0) -> dict:
    """PSNR of the VAE's reconstructions (posterior mean) of the held-out episodes of an ingest
    directory `demos`: over whole frames, and in a box around the task's object and its goal in every
    fixed camera. `episodes` > 0: the first that many held-out episodes only. Needs the dataset's
    `observation.environment_state` (lingbot's MetaWorld collection records it)."""
    from pathlib import Path

    from lingbot.vae.fit import load_frames
    from lingbot.vae.wan import decode_latents, encode_clip, load_vae, to_pixels, usable_frames

    manifest, split, layout, tasks, positions = _scene(demos)
    held_out = list(split["val"])[: episodes or None]
    vae = load_vae(Path(vae_dir)).eval()
    totals = {name: [0.0, 0] for name in ("frame", *POINTS)}  # squared error sum, pixel count
    per_task: dict[str, dict] = {}
    size = None  # the image side, from the first clip scored
    for camera_key in manifest["keys"]["cameras"]:
        camera = camera_key.removeprefix("observation.images.")
        clips = load_frames(layout, [camera_key], held_out)
        for ep, clip in zip(held_out, clips):
            task = tasks[ep]
            size = clip.shape[1]
            matrix = camera_projection(task, camera, size)
            if matrix is None:
                continue
            n = usable_frames(len(clip))
            recon = decode_latents(vae, encode_clip(vae, to_pixels(clip[:n]).to(vae.device)))[0]  # (n, H, W, 3)
            original = clip[:n]
            err = (original.astype(np.float64) - recon.astype(np.float64)) ** 2
            sums = {"frame": (err.sum(), err.size)}
            for name, masks in point_masks(matrix, positions[ep][:n], size).items():
                picked = err[masks]
                sums[name] = (picked.sum(), picked.size)
            row = per_task.setdefault(task, {name: [0.0, 0] for name in totals})
            for name, (total, count) in sums.items():
                for acc in (totals[name], row[name]):
                    acc[0] += total
                    acc[1] += count

    def db(acc):
        return round(float(10 * np.log10(255.0**2 / (acc[0] / acc[1]))), 3) if acc[1] and acc[0] else None

    return {"episodes": len(held_out), "box_px": box_side(size) if size else None,
            **{f"{name}_psnr_db": db(acc) for name, acc in totals.items()},
            "per_task": {t: {f"{name}_psnr_db": db(acc) for name, acc in row.items()} for t, row in sorted(per_task.items())}}


PROBE_RIDGE = (1e2, 1e3, 1e4, 1e5)  # ridge strengths tried: x^T x has ~N (frames) on its diagonal, N ~ 400 per task
PROBE_FOLDS = 4  # inner cross-validation folds (by episode) that pick the strength
PROBE_SCORE_FOLDS = 10  # outer folds (by episode): every episode's frames are predicted by a read-out fitted without it


def latent_targets(pixels: np.ndarray, n_latent: int) -> np.ndarray:
    """(T, ...) per-frame values -> (n_latent, ...) the value at the last frame each causal latent frame
    encodes (frame 0, then 4, 8, ...)."""
    from lingbot.vae.wan import TEMPORAL_GROUP

    return pixels[np.minimum(np.arange(n_latent) * TEMPORAL_GROUP, len(pixels) - 1)]


def ridge_fit(x: np.ndarray, y: np.ndarray, strength: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closed-form ridge of y (N, k) on centred x (N, d): (mean, weights, intercept). x is not rescaled per
    column: the latents are already normalised per channel, and a cell that never changes in training
    (a static corner) would be blown up by its ~0 spread on held-out frames."""
    mean, y_mean = x.mean(0), y.mean(0)
    xc = x - mean
    weights = np.linalg.solve(xc.T @ xc + strength * np.eye(x.shape[1]), xc.T @ (y - y_mean))
    return mean, weights, y_mean


def ridge_predict(fit, x: np.ndarray) -> np.ndarray:
    mean, weights, y_mean = fit
    return (x - mean) @ weights + y_mean


def episode_folds(episode: np.ndarray, k: int) -> np.ndarray:
    """Fold of each row: its episode's rank modulo k (all of an episode's frames in one fold)."""
    return np.searchsorted(np.unique(episode), episode) % k


def ridge_by_episode(x: np.ndarray, y: np.ndarray, episode: np.ndarray):
    """A ridge fit whose strength minimises the squared error of episode-wise cross-validation."""
    folds = episode_folds(episode, min(PROBE_FOLDS, len(np.unique(episode))))

    def cv_error(strength):
        return sum(((ridge_predict(ridge_fit(x[folds != k], y[folds != k], strength), x[folds == k])
                     - y[folds == k]) ** 2).sum() for k in np.unique(folds) if (folds != k).any())

    strength = min(PROBE_RIDGE, key=cv_error)
    return strength, ridge_fit(x, y, strength)


def probe_scores(x: np.ndarray, y: np.ndarray, episode: np.ndarray) -> dict | None:
    """Ridge read-out of y (N, 2 * len(POINTS): each point's pixel column and row) from x (N, d), scored by
    cross-fitting: the episodes split into PROBE_SCORE_FOLDS folds, each fold's frames predicted by a
    read-out fitted on the others (its strength by cross-validation within them). Per point the RMSE in
    pixels over every frame and R^2 against predicting each fold's training mean. Every episode is
    scored, not a handful of held-out ones: a goal that is fixed within an episode has one value per
    episode, and four episodes' R^2 is mostly noise. None with fewer than two episodes."""
    n_eps = len(np.unique(episode))
    if n_eps < 2:
        return None
    folds = episode_folds(episode, min(PROBE_SCORE_FOLDS, n_eps))
    pred, base, strengths = np.empty_like(y), np.empty_like(y), []
    for k in np.unique(folds):
        out = folds == k
        strength, fit = ridge_by_episode(x[~out], y[~out], episode[~out])
        pred[out], base[out] = ridge_predict(fit, x[out]), y[~out].mean(0)
        strengths.append(strength)
    row = {"ridge": float(np.median(strengths)), "episodes": int(n_eps), "frames": len(y)}
    for i, name in enumerate(POINTS):
        cols = slice(2 * i, 2 * i + 2)
        mse = ((pred[:, cols] - y[:, cols]) ** 2).sum(1).mean()
        spread = ((base[:, cols] - y[:, cols]) ** 2).sum(1).mean()
        row[f"{name}_rmse_px"] = round(float(np.sqrt(mse)), 3)
        row[f"{name}_r2"] = round(float(1 - mse / spread), 4) if spread > 0 else None
    return row


def probe_object_positions(demos, vae_dir, camera: str = "corner3") -> dict:
    """How well a linear read-out of the VAE's latents finds the objects: per task, a ridge regression from
    the fixed `camera`'s latent frame (all its cells and channels) to the object's and the goal's pixel in
    that camera, cross-fitted over the task's episodes, training and held-out alike (`probe_scores`: each
    episode read by a fit that never saw it): RMSE in pixels and R^2 against predicting the mean.
    Reconstruction PSNR cannot see a latent that knows where the puck is without drawing it sharply; this
    can."""
    from pathlib import Path

    from lingbot.errors import LingbotError
    from lingbot.vae.fit import load_frames
    from lingbot.vae.wan import encode_clip, load_vae, to_pixels, usable_frames

    manifest, split, layout, tasks, positions = _scene(demos)
    key = f"observation.images.{camera}"
    if key not in manifest["keys"]["cameras"]:
        raise LingbotError(f"{demos}: no camera {camera!r} (cameras: {manifest['keys']['cameras']})")
    vae = load_vae(Path(vae_dir)).eval()
    episodes = list(split["train"]) + list(split["val"])
    samples: dict[str, dict] = {}  # task -> {"x": [], "y": [], "ep": []}
    size = None
    for ep, clip in zip(episodes, load_frames(layout, [key], episodes)):
        task, size = tasks[ep], clip.shape[1]
        matrix = camera_projection(task, camera, size)
        if matrix is None:
            raise LingbotError(f"camera {camera!r} moves: pick a fixed camera to probe")
        n = usable_frames(len(clip))
        z = encode_clip(vae, to_pixels(clip[:n]).to(vae.device))[0]  # (z, t, h, w)
        x = z.transpose(0, 1).flatten(1).cpu().double().numpy()
        y = np.concatenate(list(point_pixels(matrix, positions[ep][:n]).values()), axis=1)
        acc = samples.setdefault(task, {"x": [], "y": [], "ep": []})
        acc["x"].append(x)
        acc["y"].append(latent_targets(y, len(x)))
        acc["ep"] += [ep] * len(x)
    per_task = {}
    for task, acc in sorted(samples.items()):
        row = probe_scores(np.concatenate(acc["x"]), np.concatenate(acc["y"]), np.asarray(acc["ep"]))
        if row is not None:
            per_task[task] = row
    means = {}
    for name in POINTS:
        scores = [r[f"{name}_r2"] for r in per_task.values() if r[f"{name}_r2"] is not None]
        # the median: a task whose point barely moves has an R^2 of any size
        means[f"{name}_r2_median"] = round(float(np.median(scores)), 4) if scores else None
    return {"camera": camera, "image_px": size, **means, "per_task": per_task}
