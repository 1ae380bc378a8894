"""What the VAE keeps of the objects: the projection lands on the object, and the box metric sees a
dropped puck that whole-frame PSNR barely notices."""

import numpy as np

from lingbot.eval.objects import box_masks, box_psnr, camera_projection, project, score_vae_objects


def test_the_projection_lands_on_the_object_in_the_rendered_frame():
    """The puck's projection into corner3 (upright, as recorded) hits pixels MuJoCo's segmentation
    renders as the puck; a moving camera has no fixed projection."""
    from lingbot.sim.metaworld import MetaWorldEnv, object_positions

    import mujoco

    env = MetaWorldEnv("push-v3", 64, ("corner3",))
    obs = env.reset(5)
    renderer = mujoco.Renderer(env.env.model, 64, 64)
    renderer.enable_segmentation_rendering()
    renderer.update_scene(env.env.data, camera="corner3")
    geoms = renderer.render()[::-1, ::-1, 0]  # turned upright as MetaWorldEnv.render turns corner3
    renderer.close()
    col, row = np.round(project(camera_projection("push-v3", "corner3", 64), object_positions(obs)[None, :3])[0])
    model = env.env.model
    near = geoms[int(row) - 1 : int(row) + 2, int(col) - 1 : int(col) + 2].ravel()
    bodies = {mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_BODY, model.geom_bodyid[g]) for g in near if g >= 0}
    env.close()
    assert "obj" in bodies
    assert camera_projection("push-v3", "gripperPOV", 64) is None


def test_the_box_metric_sees_a_dropped_puck():
    rng = np.random.default_rng(0)
    table = np.full((4, 64, 64, 3), 120, np.uint8)
    frames = table.copy()
    frames[:, 30:33, 20:23] = (200, 30, 30)  # a 3x3 pixel puck
    kept = np.clip(frames.astype(int) + rng.integers(-3, 4, frames.shape), 0, 255).astype(np.uint8)
    dropped = np.clip(table.astype(int) + rng.integers(-3, 4, frames.shape), 0, 255).astype(np.uint8)
    masks = box_masks(np.array([[21.0, 31.0]] * 4), 64)
    assert masks[0].sum() == 49  # a 7x7 box at 64x64
    whole = np.ones_like(masks)
    # The dropped puck: ~35 dB over the whole frame, ~17 dB in its box (the kept one: ~42 dB).
    assert box_psnr(frames, kept, masks) > 40 > 25 > box_psnr(frames, dropped, masks)
    assert box_psnr(frames, dropped, whole) > box_psnr(frames, dropped, masks) + 15


def test_score_vae_reports_boxes_per_task(ingested, vae_dir):
    report = score_vae_objects(ingested, vae_dir, episodes=2)
    assert report["episodes"] == 2 and report["box_px"] >= 3
    for name in ("frame", "object", "goal"):
        assert 0 < report[f"{name}_psnr_db"] < 60
    assert set(report["per_task"]) <= {"drawer-open-v3", "drawer-close-v3"} and report["per_task"]


def test_score_vae_skips_a_dataset_without_object_positions(ingested, vae_dir, tmp_path):
    """A robot's own dataset does not say where its objects are: the stage reports nothing, no error."""
    import json
    import shutil
    import subprocess
    import sys

    demos = tmp_path / "demos"
    shutil.copytree(ingested, demos)
    info = demos / "dataset" / "meta" / "info.json"
    meta = json.loads(info.read_text())
    del meta["features"]["observation.environment_state"]
    info.write_text(json.dumps(meta))
    out = tmp_path / "objects.json"
    proc = subprocess.run([sys.executable, "-m", "lingbot.cli", "score-vae", str(demos), "--vae", str(vae_dir),
                           "--preset", "tiny", "--metrics", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text()) == {"scored": False, "episodes": 0}


def test_the_probe_finds_objects_that_the_latents_encode_and_not_ones_they_drop():
    """Two hand-made sets of 'latents' for the same episodes: one holds the puck's pixel as a bump in a
    grid of cells (plus noise), the other noise alone. The read-out of the first finds the puck in episodes
    it was not fitted on; the second's does no better than the mean."""
    from lingbot.eval.objects import probe_scores

    rng = np.random.default_rng(0)
    episodes, frames, cells = 12, 20, 8
    ep = np.repeat(np.arange(episodes), frames)
    puck = rng.uniform(4, 60, (len(ep), 2))  # (column, row) in a 64x64 image
    goal = np.repeat(rng.uniform(4, 60, (episodes, 2)), frames, axis=0)
    y = np.concatenate([puck, goal], axis=1)
    centres = (np.arange(cells) + 0.5) * 64 / cells
    bump = np.exp(-((puck[:, None, None, 0] - centres[None, None, :]) ** 2
                    + (puck[:, None, None, 1] - centres[None, :, None]) ** 2) / (2 * 8.0**2))
    noise = rng.normal(size=(len(ep), cells * cells))
    kept = probe_scores(10 * bump.reshape(len(ep), -1) + 0.5 * noise, y, ep)  # ~unit scale, as latents
    dropped = probe_scores(noise, y, ep)
    assert kept["object_r2"] > 0.8 and kept["object_rmse_px"] < 8
    assert dropped["object_r2"] < 0.1 and dropped["object_rmse_px"] > 15
    assert kept["episodes"] == episodes and kept["frames"] == len(ep)
    assert dropped["goal_r2"] < 0.1  # the goal is in neither
    assert probe_scores(noise[ep == 0], y[ep == 0], ep[ep == 0]) is None  # one episode: nothing to hold out


def test_score_vae_probes_the_fixed_camera(ingested, vae_dir):
    from lingbot.eval.objects import probe_object_positions

    report = probe_object_positions(ingested, vae_dir, "corner3")
    assert report["camera"] == "corner3" and report["per_task"]
    for row in report["per_task"].values():
        assert row["episodes"] >= 2 and row["frames"] > row["episodes"] and row["object_rmse_px"] >= 0
