"""What a video VAE keeps of the objects: PSNR in a small box around each object's projection.

PSNR over a whole 64x64 frame is mostly a static table: a VAE that drops a 2-3 pixel puck loses a few
hundredths of a dB there. MetaWorld knows where the task's object and goal are (collect records them as
`observation.environment_state`); projected into each fixed camera, a box of BOX_FRACTION of the image
around each point is scored on its own, on the held-out episodes' reconstructions. Moving cameras (the
wrist view) are left out: where an object lies in them needs the camera's pose per frame.
"""

from __future__ import annotations

import numpy as np

BOX_FRACTION = 0.1  # box side as a fraction of the image side (7 px at 64x64)
POINTS = ("object", "goal")  # observation.environment_state: object xyz, goal xyz


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


def point_masks(matrix: np.ndarray, positions: np.ndarray, image_size: int) -> dict[str, np.ndarray]:
    """{point: (T, S, S) box masks} of each of POINTS, from (T, 3 * len(POINTS)) world positions per frame
    (`observation.environment_state`) seen through the camera `matrix`."""
    return {name: box_masks(project(matrix, positions[:, 3 * i : 3 * i + 3]), image_size)
            for i, name in enumerate(POINTS)}


def box_psnr(original: np.ndarray, reconstruction: np.ndarray, masks: np.ndarray) -> float:
    """PSNR (dB, 8-bit peak) of (T, S, S, 3) uint8 frames over the masked pixels only."""
    err = (original.astype(np.float64) - reconstruction.astype(np.float64)) ** 2
    mse = err[masks].mean() if masks.any() else 0.0
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def score_vae_objects(demos, vae_dir, episodes: int = 0) -> dict:
    """PSNR of the VAE's reconstructions (posterior mean) of the held-out episodes of an ingest
    directory `demos`: over whole frames, and in a box around the task's object and its goal in every
    fixed camera. `episodes` > 0: the first that many held-out episodes only. Needs the dataset's
    `observation.environment_state` (lingbot's MetaWorld collection records it)."""
    from pathlib import Path

    from lingbot.data.lerobot_io import episode_tasks, read_frames
    from lingbot.errors import LingbotError
    from lingbot.sim.metaworld import task_description, task_names
    from lingbot.vae.fit import load_frames, read_demos
    from lingbot.vae.wan import decode_latents, encode_clip, load_vae, to_pixels, usable_frames

    manifest, split, layout = read_demos(Path(demos))
    key = "observation.environment_state"
    if key not in layout.features:
        raise LingbotError(f"{Path(demos) / 'dataset'}: no {key!r} column (where the objects are): "
                           "collect the demos with lingbot's MetaWorld collection")
    held_out = list(split["val"])[: episodes or None]
    by_instruction = {task_description(t): t for t in task_names()}
    tasks = episode_tasks(layout)
    table = read_frames(layout, ["episode_index", key])
    index = table.column("episode_index").to_numpy()
    positions = np.asarray(table.column(key).to_pylist(), np.float64)
    vae = load_vae(Path(vae_dir)).eval()
    totals = {name: [0.0, 0] for name in ("frame", *POINTS)}  # squared error sum, pixel count
    per_task: dict[str, dict] = {}
    matrices: dict = {}
    size = None  # the image side, from the first clip scored
    for camera_key in manifest["keys"]["cameras"]:
        camera = camera_key.removeprefix("observation.images.")
        clips = load_frames(layout, [camera_key], held_out)
        for ep, clip in zip(held_out, clips):
            task = by_instruction.get(tasks[ep])
            size = clip.shape[1]
            if task is None:
                raise LingbotError(f"episode {ep}: task {tasks[ep]!r} is not a MetaWorld task lingbot knows")
            if (task, camera) not in matrices:
                matrices[task, camera] = camera_projection(task, camera, size)
            matrix = matrices[task, camera]
            if matrix is None:
                continue
            n = usable_frames(len(clip))
            recon = decode_latents(vae, encode_clip(vae, to_pixels(clip[:n]).to(vae.device)))[0]  # (n, H, W, 3)
            original = clip[:n]
            err = (original.astype(np.float64) - recon.astype(np.float64)) ** 2
            where = positions[index == ep][:n]
            sums = {"frame": (err.sum(), err.size)}
            for name, masks in point_masks(matrix, where, size).items():
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
