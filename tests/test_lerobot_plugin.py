"""The LeRobot plugin: the tiny lingbot bundle run by LeRobot's own tools (lerobot-eval, its factories).

LeRobot imports a plugin named on the command line (`--policy.discover_packages_path=...`); the
`lerobot_policy_lingbot` package registers policy type "lingbot" and LeRobot finds its policy and
processors by naming convention.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

# The tiny bundle's cameras, both fed from LeRobot's single MetaWorld camera.
CAMERA_MAP = {"observation.images.corner3": "observation.image", "observation.images.gripperPOV": "observation.image"}


@pytest.fixture
def lerobot_logging():
    """lerobot-eval's init_logging reconfigures this process's logging (root level, httpx at WARNING):
    give the levels back so later tests still see the debug logs they check (tests/test_hub.py)."""
    loggers = [logging.getLogger(), logging.getLogger("httpx")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def _release(tiny_bundle, tmp_path) -> str:
    """The tiny bundle published to a local hub as v1 and pulled back: what a robot's machine holds."""
    from lingbot.config import PublishConfig
    from lingbot.hub.publish import publish
    from lingbot.hub.pull import pull

    eval_path = tmp_path / "eval.json"
    eval_path.write_text(json.dumps({"success_rate": 0.5, "episodes": 2}))
    publish(tiny_bundle, eval_path, PublishConfig(repo_id="lingbot/tiny", local_dir=str(tmp_path / "hub")))
    pull("lingbot/tiny@v1", tmp_path / "release", local_hub=tmp_path / "hub")
    return str(tmp_path / "release")


@pytest.mark.parametrize("load", ["type", "path"])
def test_lerobot_eval_drives_the_lingbot_policy_for_one_episode(tiny_bundle, tmp_path, monkeypatch, lerobot_logging,
                                                                load):
    """`--policy.type=lingbot --policy.bundle=DIR` with the plugin named, or `--policy.path=<pulled release>`
    alone: LeRobot finds the plugin by its distribution name and the release's config.json."""
    from lerobot.scripts import lerobot_eval

    from lingbot.sim import lerobot_env

    # LeRobot's MetaWorld env hard-codes 500 steps (--env.episode_length is not passed to it): lingbot's
    # runner cuts the episode to 9 steps, i.e. chunks of 4 actions computed at steps 0, 4 and 8.
    steps, chunk = 9, 4
    made = []
    make_policy = lerobot_eval.make_policy
    monkeypatch.setattr(lerobot_eval, "make_policy", lambda *a, **k: made.append(make_policy(*a, **k)) or made[-1])
    out = tmp_path / "eval"
    if load == "type":
        policy_args = ["--policy.discover_packages_path=lerobot_policy_lingbot", "--policy.type=lingbot",
                       f"--policy.bundle={tiny_bundle}"]
    else:
        policy_args = [f"--policy.path={_release(tiny_bundle, tmp_path)}"]
    lerobot_env.main([
        str(steps),
        *policy_args,
        f"--policy.camera_map={json.dumps(CAMERA_MAP)}",
        "--policy.device=cpu",
        "--env.type=metaworld",
        "--env.task=drawer-open-v3",
        "--eval.n_episodes=1",
        "--eval.batch_size=1",
        "--eval.use_async_envs=false",
        f"--output_dir={out}",
    ])

    info = json.loads((out / "eval_info.json").read_text())
    assert info["overall"]["n_episodes"] == 1
    assert info["per_task"][0]["task_group"] == "drawer-open-v3"
    assert len(info["per_task"][0]["metrics"]["successes"]) == 1
    [policy] = made
    assert type(policy).__name__ == "LingbotPolicy" and policy.config.chunk_size == chunk
    # The actions came from one lingbot session: a chunk per 4 steps, the env's instruction as task.
    [session] = policy.sessions
    assert session.chunk == len(session.latency_ms) == -(-steps // chunk)
    assert session.task == "Open a drawer"


def _lerobot_batch(frames: np.ndarray, tasks: list[str], states: np.ndarray | None = None) -> dict:
    """What LeRobot's env loop hands the preprocessor for one camera: uint8 (B, H, W, 3) frames and
    the robot state (B, 4) as `agent_pos`."""
    from lerobot.envs.utils import preprocess_observation

    states = np.zeros((len(frames), 4)) if states is None else states
    obs = preprocess_observation({"pixels": frames, "agent_pos": states})
    obs["task"] = tasks
    return obs


@pytest.mark.parametrize("asynchronous", [False, True])
def test_factory_policy_acts_like_lingbot_sessions_one_per_env(tiny_bundle, asynchronous):
    """make_policy + processors on a batch of 2 envs give exactly the actions of 2 lingbot sessions.

    Called under torch.inference_mode, as LeRobot's loops do (the asynchronous session's worker thread
    then writes a cache the caller made: it must not be an inference tensor).
    """
    from lerobot.envs.configs import MetaworldEnv
    from lerobot.policies.factory import make_policy, make_policy_config, make_pre_post_processors

    import lerobot_policy_lingbot  # noqa: F401  registers "lingbot"
    from lingbot.policy.runtime import load_policy

    cfg = make_policy_config("lingbot", bundle=str(tiny_bundle), camera_map=CAMERA_MAP, device="cpu",
                             asynchronous=asynchronous)
    policy = make_policy(cfg, env_cfg=MetaworldEnv(task="drawer-open-v3"))
    pre, post = make_pre_post_processors(cfg)
    reference = load_policy(tiny_bundle, asynchronous=asynchronous)
    K, (h, w) = reference.K, reference.meta["image_size"]
    tasks = ["open the drawer", "close the drawer"]
    sessions = [reference.new_session(task, seed=reference.cfg.seed + i) for i, task in enumerate(tasks)]

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (K + 1, 2, h, w, 3), dtype=np.uint8)  # (step, env, H, W, 3)
    states = rng.uniform(-0.5, 0.5, (K + 1, 2, 4)).astype(np.float32)  # (step, env, S)
    # The env renders 2x taller and 3x wider: the policy must shrink it back to exactly these frames.
    rendered = frames.repeat(2, axis=2).repeat(3, axis=3)
    actions, expected = [], []
    for step in range(K + 1):
        with torch.inference_mode():
            actions.append(post(policy.select_action(pre(_lerobot_batch(rendered[step], tasks, states[step])))))
        expected.append([s.select_action({**{cam: frames[step, i] for cam in reference.cameras},
                                          reference.state_key: states[step, i]})
                         for i, s in enumerate(sessions)])
    actions = torch.stack(actions).numpy()  # (step, env, action_dim)
    assert actions.shape == (K + 1, 2, reference.meta["action_dim"])
    # Equal up to float rounding (1 ulp seen where a random state enters; exact with a zero state): a
    # state taken from the wrong env or step moves actions by ~1e-2.
    np.testing.assert_allclose(actions, np.asarray(expected, np.float32), rtol=0, atol=1e-6)
    assert not np.allclose(actions[:, 0], actions[:, 1])  # each env has its own task, frames and seed
    assert [len(s.latency_ms) for s in policy.sessions] == [2, 2]  # chunks inferred

    # reset() starts the episode over: the first chunk again, now asked for whole.
    policy.reset()
    with torch.inference_mode():
        chunk = policy.predict_action_chunk(pre(_lerobot_batch(rendered[0], tasks, states[0])))
    assert chunk.shape == (2, K, reference.meta["action_dim"])
    np.testing.assert_allclose(chunk.numpy(), np.asarray(expected[:K], np.float32).transpose(1, 0, 2),
                               rtol=0, atol=1e-6)
    assert [len(s.latency_ms) for s in policy.sessions] == [1, 1]
    for session in (*policy.sessions, *sessions):
        session.close()


def test_an_env_faster_than_the_bundle_gets_each_action_held(tiny_bundle):
    """env_fps twice the bundle's fps (LeRobot's 80 Hz MetaWorld, 40 fps data): each action is returned
    for 2 env steps and the session sees every other frame, as lingbot's own rollouts run it."""
    from lerobot.envs.configs import MetaworldEnv
    from lerobot.policies.factory import make_policy, make_policy_config, make_pre_post_processors

    import lerobot_policy_lingbot  # noqa: F401
    from lingbot.errors import LingbotError
    from lingbot.policy.runtime import load_policy

    reference = load_policy(tiny_bundle)
    fps, K, (h, w) = int(reference.meta["fps"]), reference.K, reference.meta["image_size"]
    cfg = make_policy_config("lingbot", bundle=str(tiny_bundle), camera_map=CAMERA_MAP, device="cpu",
                             env_fps=2 * fps)
    policy = make_policy(cfg, env_cfg=MetaworldEnv(task="drawer-open-v3"))
    pre, post = make_pre_post_processors(cfg)
    session = reference.new_session("open the drawer", seed=reference.cfg.seed)
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (2 * K + 2, 1, h, w, 3), dtype=np.uint8)
    states = rng.uniform(-0.5, 0.5, (2 * K + 2, 1, 4)).astype(np.float32)
    with torch.inference_mode():
        actions = np.stack([post(policy.select_action(pre(_lerobot_batch(frames[i], ["open the drawer"],
                                                                         states[i])))).numpy()[0]
                            for i in range(2 * K + 2)])
    expected = [session.select_action({**{cam: frames[i, 0] for cam in reference.cameras},
                                       reference.state_key: states[i, 0]}) for i in range(0, 2 * K + 2, 2)]
    np.testing.assert_allclose(actions[0::2], np.asarray(expected, np.float32), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(actions[1::2], actions[0::2])
    assert len(policy.sessions[0].latency_ms) == 2  # chunks at bundle steps 0 and K
    for s in (session, *policy.sessions):
        s.close()
    with pytest.raises(LingbotError, match="not a multiple of the bundle's"):
        make_policy(make_policy_config("lingbot", bundle=str(tiny_bundle), camera_map=CAMERA_MAP, device="cpu",
                                       env_fps=fps + 1), env_cfg=MetaworldEnv(task="drawer-open-v3"))


def test_a_bundle_directory_loads_like_any_lerobot_checkpoint(tiny_bundle, tmp_path):
    """`--policy.path=DIR`: LeRobot's config.json and processors saved next to the bundle's files."""
    import shutil

    from lerobot.configs import PreTrainedConfig
    from lerobot.policies.factory import make_policy, make_policy_config, make_pre_post_processors

    import lerobot_policy_lingbot  # noqa: F401
    from lerobot_policy_lingbot.configuration_lingbot import POLICY_OPTIONS
    from lingbot.config import PolicyConfig

    assert set(POLICY_OPTIONS) <= {f.name for f in dataclasses.fields(PolicyConfig)}
    release = tmp_path / "release"
    shutil.copytree(tiny_bundle, release)
    cfg = make_policy_config("lingbot", bundle=str(release), camera_map=CAMERA_MAP, device="cpu", video_steps=3)
    from lerobot.envs.configs import MetaworldEnv

    env = MetaworldEnv(task="drawer-open-v3")
    policy = make_policy(cfg, env_cfg=env)
    policy.config.bundle = ""  # the directory it is saved into is the bundle
    policy.save_pretrained(release)
    for pipeline in make_pre_post_processors(policy.config):
        pipeline.save_pretrained(release)

    loaded_cfg = PreTrainedConfig.from_pretrained(release)
    loaded_cfg.pretrained_path = release
    loaded = make_policy(loaded_cfg, env_cfg=env)
    pre, post = make_pre_post_processors(loaded_cfg, pretrained_path=str(release),
                                         preprocessor_overrides={"device_processor": {"device": "cpu"}})
    assert loaded.config.bundle == str(release) and loaded.runtime.cfg.video_steps == 3
    assert loaded.config.camera_map == CAMERA_MAP
    frame = np.random.default_rng(1).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    action = post(loaded.select_action(pre(_lerobot_batch(frame, [""]))))
    assert action.shape == (1, 4) and torch.isfinite(action).all()
    assert loaded.sessions[0].task == loaded.runtime.tasks[0]  # no instruction: the bundle's first task


def test_features_from_the_training_dataset_need_no_camera_map(tiny_bundle, ingested):
    """lerobot-record's path: features from a dataset with the bundle's own camera keys."""
    from lerobot.datasets import LeRobotDatasetMetadata
    from lerobot.policies.factory import make_policy, make_policy_config

    import lerobot_policy_lingbot  # noqa: F401

    meta = LeRobotDatasetMetadata("local/tiny", root=ingested / "dataset")
    policy = make_policy(make_policy_config("lingbot", bundle=str(tiny_bundle), device="cpu"), ds_meta=meta)
    assert set(policy.runtime.cameras) <= set(policy.config.image_features)
    assert policy.config.action_feature.shape == (policy.runtime.layout.robot_dim,)


def test_unmapped_camera_and_wrong_chunk_size_are_clear_errors(tiny_bundle):
    from lerobot.envs.configs import MetaworldEnv
    from lerobot.policies.factory import make_policy, make_policy_config

    import lerobot_policy_lingbot  # noqa: F401
    from lingbot.errors import LingbotError

    env = MetaworldEnv(task="drawer-open-v3")
    with pytest.raises(LingbotError, match=r"observation.images.corner3.*camera_map"):
        make_policy(make_policy_config("lingbot", bundle=str(tiny_bundle), device="cpu"), env_cfg=env)
    with pytest.raises(LingbotError, match="corner 3, not a camera of the bundle"):
        make_policy(make_policy_config("lingbot", bundle=str(tiny_bundle), device="cpu",
                                       camera_map={**CAMERA_MAP, "corner 3": "observation.image"}), env_cfg=env)
    with pytest.raises(LingbotError, match="chunks of 4"):
        make_policy(make_policy_config("lingbot", bundle=str(tiny_bundle), camera_map=CAMERA_MAP, device="cpu",
                                       chunk_size=8), env_cfg=env)


def test_evaluate_rolls_out_in_a_lerobot_env(tiny_bundle, tmp_path, capsys):
    """`evaluate.env: lerobot`: LeRobot's own MetaWorld env and eval loop, scored as lingbot scores."""
    import yaml

    from lingbot.cli import main
    from lingbot.sim.lerobot_env import action_hold

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"preset": "tiny", "evaluate": {
        "env": "lerobot", "lerobot_env": "metaworld", "tasks": ["drawer-open-v3"], "episodes": 1,
        "camera_map": [f"{k}={v}" for k, v in CAMERA_MAP.items()]}}))
    out = tmp_path / "eval"
    assert main(["evaluate", "--params", str(params), "--policy", str(tiny_bundle), "--out", str(out),
                 "--metrics", str(tmp_path / "eval.json"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["episodes"] == 1 and metrics["drawer-open-v3/episodes"] == 1
    assert metrics["success_rate"] in (0.0, 1.0) and 0 <= metrics["success_ci_low"] <= metrics["success_ci_high"]
    assert json.loads((out / "episodes.json").read_text())[0]["seed"] == 100_000
    # The tiny preset's 12 steps at 40 fps: 24 of LeRobot's 80 Hz MetaWorld steps, not the env's own 500.
    assert action_hold(tiny_bundle, "metaworld") == (80, 2)
    params.write_text(yaml.safe_dump({"preset": "tiny", "evaluate": {"env": "lerobot", "camera_map": ["corner3"]}}))
    assert main(["evaluate", "--params", str(params), "--policy", str(tiny_bundle), "--out", str(out)]) == 2
    assert "is not bundle_camera=lerobot_key" in capsys.readouterr().err
