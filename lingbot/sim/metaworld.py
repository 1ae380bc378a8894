"""MetaWorld environments with fast offscreen cameras, shared by demo collection and evaluation.

Rendering is the cost of a rollout: MuJoCo's default 4096 shadow map makes a software-rendered
(EGL/Mesa) 64x64 frame ~60 ms; with shadows, reflections and skybox off it is a few ms. Physics is
~0.3 ms a step. We render with our own `mujoco.Renderer` rather than gymnasium's MujocoRenderer, which
also fixes the upside-down corner cameras that one produces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

# Headless GL must be chosen before mujoco is imported anywhere in the process.
os.environ.setdefault("MUJOCO_GL", "egl")

SIM_HZ = 80  # MetaWorld: timestep 2.5 ms x frame_skip 5
STATE_DIM = 4  # proprioception: hand xyz + gripper opening (obs[:4])
ACTION_DIM = 4  # hand delta xyz + gripper effort, in [-1, 1]
GOAL_MARKER_RADIUS = 0.04  # metres, visual only
# MetaWorld's corner cameras look at the table upside down; we rotate their images by 180 degrees.
ROTATED_CAMERAS = frozenset({"corner", "corner2", "corner3"})
STATE_NAMES = ("hand_x", "hand_y", "hand_z", "gripper")
ACTION_NAMES = ("delta_x", "delta_y", "delta_z", "gripper")
# MetaWorld's observation: hand (0:3), gripper (3), first object's position (4:7) and quaternion, a
# second object, the previous frame's copy (18:36), the goal (36:39).
OBJECT_NAMES = ("object_x", "object_y", "object_z", "goal_x", "goal_y", "goal_z")


def object_positions(obs: np.ndarray) -> np.ndarray:
    """(6,) float32: the task's first object and its goal, world metres, from a MetaWorld observation."""
    return np.concatenate([obs[4:7], obs[36:39]]).astype(np.float32)


def task_names() -> list[str]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return sorted([*ALL_V3_ENVIRONMENTS, *MEMORY_TASKS])


def task_description(task: str) -> str:
    """A natural-language instruction for a MetaWorld task id, e.g. 'drawer-open-v3' -> 'drawer open'."""
    words = task.removesuffix("-v3").replace("-", " ")
    return {
        "drawer open": "open the drawer",
        "drawer close": "close the drawer",
        "push": "push the puck to the goal",
        "reach": "reach the goal position",
        "button press topdown": "press the button from the top",
        "button press": "press the button",
        "door open": "open the door",
        "door close": "close the door",
        "pick place": "pick up the puck and place it at the goal",
        "button press twice": "press the button twice, then return",
    }.get(words, words)


class PressCounter:
    """Success of "button-press-twice", from the button's travel and the hand alone (any policy).

    A press is the button driven down by PRESS_TRAVEL below its lowest point since the last release;
    a release, the button rising RELEASE_RISE above its deepest point. Success: exactly two presses,
    then the hand back within HOME_RADIUS of its start; a third press fails the episode for good.
    """

    PRESS_TRAVEL = 0.02  # metres of button travel (its range is 6 cm)
    RELEASE_RISE = 0.01
    HOME_RADIUS = 0.05
    PRESSES = 2

    def reset(self, obs: np.ndarray) -> None:
        self.home = obs[:3].copy()
        self.rest_z = float(obs[6])
        self.presses = 0
        self.pressed = False
        self.extreme = 0.0  # lowest travel since the release, or deepest since the press
        self.success = False

    def update(self, obs: np.ndarray) -> bool:
        # The button can spring back past its rest height for a moment (a hand pulling off it fast):
        # rising back to rest from there is not a press.
        travel = max(0.0, self.rest_z - float(obs[6]))
        if not self.pressed:
            self.extreme = min(self.extreme, travel)
            if travel > self.extreme + self.PRESS_TRAVEL:
                self.pressed, self.extreme = True, travel
                self.presses += 1
        else:
            self.extreme = max(self.extreme, travel)
            if travel < self.extreme - self.RELEASE_RISE:
                self.pressed, self.extreme = False, travel
        home = float(np.linalg.norm(obs[:3] - self.home)) < self.HOME_RADIUS
        if self.presses == self.PRESSES and not self.pressed and home:
            self.success = True
        return self.success


@dataclass
class MetaWorldEnv:
    """One MetaWorld task with goal-observable state, seeded resets and fast cameras."""

    task: str
    image_size: int  # image height, pixels
    cameras: tuple[str, ...]
    image_width: int = 0  # 0: square

    def __post_init__(self) -> None:
        import mujoco
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

        memory = MEMORY_TASKS.get(self.task)
        key = f"{memory.scene if memory else self.task}-goal-observable"
        if key not in ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE:
            raise ValueError(f"unknown MetaWorld task {self.task!r}")
        self.env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[key]()
        self.env._freeze_rand_vec = False
        self.env.seeded_rand_vec = True
        model = self.env.model
        for name in self.cameras:
            if mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name) < 0:
                raise ValueError(f"task {self.task}: no camera named {name!r}")
        model.vis.quality.shadowsize = 0
        # 4x MSAA triples the software-render cost (30 -> 9.5 ms at 64x64); a framebuffer of exactly
        # the image size avoids rendering pixels nobody reads.
        model.vis.quality.offsamples = 0
        width = self.image_width or self.image_size
        model.vis.global_.offwidth = width
        model.vis.global_.offheight = self.image_size
        # Goal markers are 2 cm spheres that vanish at 64x64: draw them larger (sites never collide).
        goal = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "goal")
        if goal >= 0:
            model.site_size[goal] = np.maximum(model.site_size[goal], GOAL_MARKER_RADIUS)
        self.renderer = mujoco.Renderer(model, self.image_size, width)
        flags = self.renderer.scene.flags
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                     mujoco.mjtRndFlag.mjRND_SKYBOX):
            flags[flag] = 0
        self.max_path_length = self.env.max_path_length
        self.counter = memory.success() if memory else None  # our tasks' success; else MetaWorld's

    def reset(self, seed: int) -> np.ndarray:
        import mujoco

        # MetaWorld's reset sets positions but keeps the rest of MjData (the solver's warm start above
        # all), so an episode's trajectory depended at ~1e-9 on the episode this env ran before (a
        # worker's history): enough to flip pixels. A full reset first makes each episode a function
        # of its seed alone.
        mujoco.mj_resetData(self.env.model, self.env.data)
        self.env.seed(seed)
        obs, _ = self.env.reset(seed=seed)
        if self.counter is not None:
            self.counter.reset(obs)
        return obs

    def state(self, obs: np.ndarray) -> np.ndarray:
        return obs[:STATE_DIM]

    def clip(self, action: np.ndarray) -> np.ndarray:
        return np.clip(action, -1.0, 1.0)

    def step(self, action: np.ndarray, repeat: int = 1) -> tuple[np.ndarray, bool]:
        """Apply `action` for `repeat` sim steps; returns the last obs and whether success was reached."""
        success = False
        for _ in range(repeat):
            obs, _, _, truncated, info = self.env.step(action)
            done = self.counter.update(obs) if self.counter is not None else bool(info["success"])
            success = success or done
            if truncated:
                break
        return obs, success

    def render(self) -> dict[str, np.ndarray]:
        """uint8 HxWx3 image per camera."""
        images = {}
        for name in self.cameras:
            self.renderer.update_scene(self.env.data, camera=name)
            image = self.renderer.render()
            images[name] = np.ascontiguousarray(image[::-1, ::-1] if name in ROTATED_CAMERAS else image)
        return images

    def close(self) -> None:
        self.renderer.close()
        self.env.close()


class PressTwiceExpert:
    """Scripted expert of "button-press-twice": over the button, press, lift, press, lift, back, home.

    Unlike MetaWorld's experts it keeps a phase (the presses made), so `reset` it with every episode.
    """

    HOVER = 0.06  # metres above the button's rest height between presses
    DEPTH = 0.045  # button travel at which a press turns into a lift

    def __init__(self, presses: int = PressCounter.PRESSES):
        self.presses_wanted = presses

    def reset(self, obs: np.ndarray) -> None:
        self.home = obs[:3].copy()
        self.rest = obs[4:7].copy()
        self.phase, self.presses = "approach", 0

    def get_action(self, obs: np.ndarray) -> np.ndarray:
        from metaworld.policies.policy import move

        hand, button = obs[:3], obs[4:7]
        hover = self.rest + np.array([0.0, 0.0, self.HOVER])
        if self.phase == "approach" and np.linalg.norm(hand - hover) < 0.015:
            self.phase = "press"
        elif self.phase == "press" and self.rest[2] - button[2] > self.DEPTH:
            self.phase, self.presses = "lift", self.presses + 1
        elif self.phase == "lift" and hand[2] > hover[2] - 0.01:
            self.phase = "press" if self.presses < self.presses_wanted else "back"
        # back at hover height first: the straight line home runs through the button box
        back = np.array([self.home[0], self.home[1], hover[2]])
        if self.phase == "back" and np.linalg.norm(hand - back) < 0.03:
            self.phase = "home"
        target = {"approach": hover, "press": self.rest - np.array([0.0, 0.0, 0.1]),
                  "lift": hover, "back": back, "home": self.home}[self.phase]
        return np.append(move(hand, target, p=25.0), 1.0)  # gripper closed, as MetaWorld's button expert


@dataclass(frozen=True)
class MemoryTask:
    """A task of our own on a MetaWorld scene: the scene's task id, its success and its expert."""

    scene: str  # the MetaWorld task whose scene, objects and resets it uses
    success: type  # reset(obs) per episode, update(obs) -> success so far, per sim step
    expert: type  # reset(obs) per episode, get_action(obs)


# "button-press-twice": press the top-down button exactly twice, then bring the hand back to where it
# started. Between and after the presses the scene looks the same (the button springs back), so which
# press comes next is in the history only: a single-frame policy cannot know, by construction.
MEMORY_TASKS = {"button-press-twice": MemoryTask("button-press-topdown-v3", PressCounter, PressTwiceExpert)}


def expert_policy(task: str):
    from metaworld.policies import ENV_POLICY_MAP

    if task in MEMORY_TASKS:
        return MEMORY_TASKS[task].expert()
    if task not in ENV_POLICY_MAP:
        raise ValueError(f"no scripted expert for MetaWorld task {task!r}")
    return ENV_POLICY_MAP[task]()
