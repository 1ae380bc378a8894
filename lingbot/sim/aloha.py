"""ALOHA's bimanual simulation (gym-aloha's MuJoCo scenes): transfer cube and insertion, with a lean
camera and a scripted expert.

Two ViperX 300s arms, 14-D joint-position actions and states as in LeRobot's `aloha_sim_*` datasets
(per arm: waist, shoulder, elbow, forearm roll, wrist angle, wrist rotate in radians, then the gripper
normalised to 0 closed .. 1 open), 50 Hz control (10 physics steps of 2 ms), 400-step episodes. An
episode is a function of its seed: the objects are placed by gym-aloha's own samplers given that seed,
as LeRobot's `aloha` env places them for `reset(seed=...)`. Success is the task's full reward (4):
transfer cube, the cube held by the left gripper off the table; insertion, the peg touching the pin
inside the socket.

gym-aloha renders three 480x640 cameras on every step (~380 ms here) whatever size is asked for; this
adapter steps the same dm_control physics and tasks (so rewards and resets are gym-aloha's own) and
renders only the chosen cameras at the chosen size through `mujoco.Renderer`, shadows and
multisampling off (~10 ms for one 96x128 camera).

The expert follows ACT's recipe for scripted data: open-loop end-effector waypoints drive the two
mocap bodies of the end-effector scenes (no inverse kinematics), and the joint trajectory of that
rollout, with the grippers replaced by the gripper command, becomes the joint-space actions; `collect`
keeps a demonstration only when the joint-space replay succeeds. On MuJoCo 3 a gripper's orientation
lags its mocap by 15-48 degrees with the scenes' welds as written (ACT issue #45, MuJoCo #1483), and the
cube slips out; a torque scale of 3.75 on both welds (MetaWorld's fix for the same change) holds it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")

SIM_HZ = 50
ROBOT_TYPE = "aloha"
EPISODE_STEPS = 400  # gym-aloha's and LeRobot's episode length
FULL_REWARD = 4
WELD_TORQUESCALE = 3.75
_ARM = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate", "gripper")
# LeRobot's aloha_sim_* datasets name their 14 state and action channels so.
STATE_NAMES = tuple(f"{side}_{joint}" for side in ("left", "right") for joint in _ARM)
ACTION_NAMES = STATE_NAMES
GRIPPERS = (6, 13)  # the normalised gripper channels
TASKS = {  # our task id -> gym-aloha's scene name and LeRobot's gym id
    "aloha-transfer-cube": ("transfer_cube", "AlohaTransferCube-v0"),
    "aloha-insertion": ("insertion", "AlohaInsertion-v0"),
}
DESCRIPTIONS = {
    "aloha-transfer-cube": "pick up the red cube with the right arm and hand it to the left arm",
    "aloha-insertion": "pick up the peg and the socket and insert the peg into the socket",
}


def task_names() -> list[str]:
    return sorted(TASKS)


def task_description(task: str) -> str:
    return DESCRIPTIONS[task]


def lerobot_task(task: str) -> str:
    """LeRobot's `--env.task` for one of our ALOHA tasks (e.g. AlohaTransferCube-v0)."""
    return TASKS[task][1]


def object_poses(scene: str, seed: int) -> np.ndarray:
    """The objects' free-joint poses (7 per object: xyz, wxyz) gym-aloha places for `seed`."""
    from gym_aloha.utils import sample_box_pose, sample_insertion_pose

    if scene == "transfer_cube":
        return sample_box_pose(seed)
    return np.concatenate(sample_insertion_pose(seed))


def _physics(xml: str):
    from dm_control import mujoco as dm_mujoco
    from gym_aloha.constants import ASSETS_DIR

    return dm_mujoco.Physics.from_xml_path(str(ASSETS_DIR / xml))


def _lean_renderer(physics, height: int, width: int):
    """A `mujoco.Renderer` of exactly the image size, shadows, reflections, skybox and MSAA off."""
    import mujoco

    model = physics.model.ptr
    model.vis.quality.shadowsize = 0
    model.vis.quality.offsamples = 0
    model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), width)
    model.vis.global_.offheight = max(int(model.vis.global_.offheight), height)
    renderer = mujoco.Renderer(model, height, width)
    flags = renderer.scene.flags
    for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION, mujoco.mjtRndFlag.mjRND_SKYBOX):
        flags[flag] = 0
    return renderer


@dataclass
class AlohaEnv:
    """One ALOHA task in joint space: seeded resets, gym-aloha's physics and reward, lean cameras."""

    task: str
    image_size: int  # image height, pixels
    cameras: tuple[str, ...]
    image_width: int  # pixels

    def __post_init__(self) -> None:
        import mujoco
        from gym_aloha.constants import DT
        from gym_aloha.tasks.sim import InsertionTask, TransferCubeTask

        if self.task not in TASKS:
            raise ValueError(f"unknown ALOHA task {self.task!r} (known: {', '.join(task_names())})")
        self.scene = TASKS[self.task][0]
        self.physics = _physics(f"bimanual_viperx_{self.scene}.xml")
        self.sim_task = TransferCubeTask() if self.scene == "transfer_cube" else InsertionTask()
        model = self.physics.model.ptr
        for name in self.cameras:
            if mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name) < 0:
                raise ValueError(f"task {self.task}: no camera named {name!r}")
        self.renderer = _lean_renderer(self.physics, self.image_size, self.image_width)
        self.substeps = round(DT / self.physics.model.opt.timestep)
        self.max_path_length = EPISODE_STEPS
        self.counter = None  # success is the task's own reward

    def reset(self, seed: int) -> dict:
        from gym_aloha.tasks import sim

        sim.BOX_POSE[0] = object_poses(self.scene, seed)  # gym-aloha's tasks read the pose from here
        self.sim_task.random.seed(seed)
        with self.physics.reset_context():
            self.sim_task.initialize_episode(self.physics)
        return self.observation()

    def observation(self) -> dict:
        return {"qpos": self.sim_task.get_qpos(self.physics).astype(np.float32),
                "env_state": self.physics.data.qpos[16:].copy()}

    def state(self, obs: dict) -> np.ndarray:
        return obs["qpos"]

    def clip(self, action: np.ndarray) -> np.ndarray:
        """Joint targets go as they are: each actuator clamps to its own range."""
        return action

    def step(self, action: np.ndarray, repeat: int = 1) -> tuple[dict, bool]:
        """Apply the 14-D joint target for `repeat` control steps; the last obs and whether the full
        reward was reached (the physics clamps each joint to its actuator's range)."""
        success = False
        action = np.asarray(action, dtype=np.float64)
        for _ in range(repeat):
            self.sim_task.before_step(action, self.physics)
            self.physics.step(self.substeps)
            self.sim_task.after_step(self.physics)
            success = success or self.sim_task.get_reward(self.physics) == FULL_REWARD
        return self.observation(), success

    def render(self) -> dict[str, np.ndarray]:
        images = {}
        for name in self.cameras:
            self.renderer.update_scene(self.physics.data.ptr, camera=name)
            images[name] = self.renderer.render().copy()
        return images

    def close(self) -> None:
        self.renderer.close()


# ----------------------------------------------------------------------------------------------------
# The scripted expert: end-effector waypoints through the mocap scenes, replayed in joint space.

def axis_quat(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """The wxyz quaternion of a rotation by `degrees` about `axis` (the grippers start at identity)."""
    half = np.deg2rad(degrees) / 2
    return np.array([np.cos(half), *(np.sin(half) * np.asarray(axis, dtype=float))])


# The mocap bodies' start, aligned with the grippers at gym-aloha's START_ARM_POSE.
START_LEFT = np.array([-0.31718881, 0.5, 0.29525084])
START_RIGHT = np.array([0.31718881, 0.49999888, 0.29525084])
IDENTITY = np.array([1.0, 0.0, 0.0, 0.0])


@dataclass(frozen=True)
class Waypoint:
    t: int  # control step
    xyz: np.ndarray
    quat: np.ndarray  # wxyz
    gripper: float  # 0 closed .. 1 open


def interpolate(waypoints: list[Waypoint], t: int) -> np.ndarray:
    """(8,) xyz, unit wxyz, gripper at step `t`: linear between the waypoints around it."""
    for a, b in zip(waypoints, waypoints[1:]):
        if a.t <= t <= b.t:
            f = (t - a.t) / (b.t - a.t)
            quat = (1 - f) * a.quat + f * b.quat
            return np.concatenate([(1 - f) * a.xyz + f * b.xyz, quat / np.linalg.norm(quat),
                                   [(1 - f) * a.gripper + f * b.gripper]])
    last = waypoints[-1]
    return np.concatenate([last.xyz, last.quat, [last.gripper]])


def transfer_cube_plan(cube: np.ndarray) -> tuple[list[Waypoint], list[Waypoint]]:
    """The right gripper takes the cube from above, tilted down, and carries it to a point over the
    table's centre; the left gripper, turned a quarter about x, meets it there, closes, and the right
    one lets go and backs off."""
    meet = np.array([0.0, 0.5, 0.25])
    down = axis_quat((0, 1, 0), -60)
    across = axis_quat((1, 0, 0), 90)
    right = [Waypoint(0, START_RIGHT, IDENTITY, 0), Waypoint(90, cube + [0, 0, 0.08], down, 1),
             Waypoint(130, cube + [0, 0, -0.015], down, 1), Waypoint(170, cube + [0, 0, -0.015], down, 0),
             Waypoint(200, meet + [0.05, 0, 0], down, 0), Waypoint(220, meet, down, 0),
             Waypoint(310, meet, down, 1), Waypoint(360, meet + [0.1, 0, 0], down, 1),
             Waypoint(400, meet + [0.1, 0, 0], down, 1)]
    left = [Waypoint(0, START_LEFT, IDENTITY, 0), Waypoint(100, meet + [-0.1, 0, 0], across, 1),
            Waypoint(260, meet + [0.02, 0, 0], across, 1), Waypoint(310, meet + [0.02, 0, 0], across, 0),
            Waypoint(360, meet + [-0.1, 0, 0], across, 0), Waypoint(400, meet + [-0.1, 0, 0], across, 0)]
    return left, right


def insertion_plan(peg: np.ndarray, socket: np.ndarray) -> tuple[list[Waypoint], list[Waypoint]]:
    """Each gripper, tilted down, takes its object from above (left: the socket, right: the peg), both
    lift them to the table's centre, and the peg slides into the socket along x (to 4 cm either side of
    the centre: at 5 cm the peg stopped short of the pin in 4 of 12 seeds, at 4 cm in 2)."""
    meet = np.array([0.0, 0.5, 0.15])
    depth = 0.04
    lift = 0.00715  # the peg is held this much higher than the socket's axis
    left_down, right_down = axis_quat((0, 1, 0), 60), axis_quat((0, 1, 0), -60)
    left = [Waypoint(0, START_LEFT, IDENTITY, 0), Waypoint(120, socket + [0, 0, 0.08], left_down, 1),
            Waypoint(170, socket + [0, 0, -0.03], left_down, 1), Waypoint(220, socket + [0, 0, -0.03], left_down, 0),
            Waypoint(285, meet + [-0.1, 0, 0], left_down, 0), Waypoint(340, meet - [depth, 0, 0], left_down, 0),
            Waypoint(400, meet - [depth, 0, 0], left_down, 0)]
    right = [Waypoint(0, START_RIGHT, IDENTITY, 0), Waypoint(120, peg + [0, 0, 0.08], right_down, 1),
             Waypoint(170, peg + [0, 0, -0.03], right_down, 1), Waypoint(220, peg + [0, 0, -0.03], right_down, 0),
             Waypoint(285, meet + [0.1, 0, lift], right_down, 0), Waypoint(340, meet + [depth, 0, lift], right_down, 0),
             Waypoint(400, meet + [depth, 0, lift], right_down, 0)]
    return left, right


class AlohaExpert:
    """ACT-style scripted demonstrations for one ALOHA task, as a joint-space policy.

    `reset(obs)` plans the episode from the objects' poses in `obs`, rolls the end-effector plan out in
    the task's mocap scene, and keeps its joint trajectory (grippers: the commanded opening);
    `get_action(obs)` then plays it back step by step (open loop: `obs` is not read).
    """

    def __init__(self, task: str):
        from gym_aloha.constants import DT, PUPPET_GRIPPER_POSITION_CLOSE

        self.scene = TASKS[task][0]
        self.physics = _physics(f"bimanual_viperx_end_effector_{self.scene}.xml")
        self.physics.model.ptr.eq_data[:, 10] = WELD_TORQUESCALE
        self.substeps = round(DT / self.physics.model.opt.timestep)
        self.closed = PUPPET_GRIPPER_POSITION_CLOSE

    def plan(self, env_state: np.ndarray) -> tuple[list[Waypoint], list[Waypoint]]:
        if self.scene == "transfer_cube":
            return transfer_cube_plan(env_state[:3])
        return insertion_plan(env_state[:3], env_state[7:10])

    def reset(self, obs: dict) -> None:
        from gym_aloha.constants import START_ARM_POSE, unnormalize_puppet_gripper_position
        from gym_aloha.tasks.sim import BimanualViperXTask

        physics, data = self.physics, self.physics.data
        with physics.reset_context():
            physics.named.data.qpos[:16] = START_ARM_POSE
            data.qpos[16:] = obs["env_state"]
            data.mocap_pos[0], data.mocap_pos[1] = START_LEFT, START_RIGHT
            data.mocap_quat[0], data.mocap_quat[1] = IDENTITY, IDENTITY
            data.ctrl[:] = [self.closed, -self.closed, self.closed, -self.closed]
        left, right = self.plan(np.asarray(obs["env_state"], dtype=np.float64))
        trajectory = []
        for t in range(EPISODE_STEPS):
            # The joint target of step t is where the mocap rollout's joints are at step t.
            qpos = BimanualViperXTask.get_qpos(physics)
            pose_left, pose_right = interpolate(left, t), interpolate(right, t)
            qpos[GRIPPERS[0]], qpos[GRIPPERS[1]] = pose_left[7], pose_right[7]
            trajectory.append(qpos.astype(np.float32))
            data.mocap_pos[0], data.mocap_quat[0] = pose_left[:3], pose_left[3:7]
            data.mocap_pos[1], data.mocap_quat[1] = pose_right[:3], pose_right[3:7]
            g_left, g_right = (unnormalize_puppet_gripper_position(p[7]) for p in (pose_left, pose_right))
            data.ctrl[:] = [g_left, -g_left, g_right, -g_right]
            physics.step(self.substeps)
        self.trajectory, self.t = trajectory, 0

    def get_action(self, obs) -> np.ndarray:
        action = self.trajectory[min(self.t, len(self.trajectory) - 1)]
        self.t += 1
        return action
