"""The simulated suites behind `collect` and `evaluate`, chosen by task id: MetaWorld (`drawer-open-v3`,
our `button-press-twice`, ...) and ALOHA (`aloha-transfer-cube`, `aloha-insertion`).

Every suite's environment has the same surface: `reset(seed) -> obs`, `step(action, repeat) -> (obs,
success)`, `render() -> {camera: HxWx3 uint8}`, `state(obs)`, `clip(action)`, `max_path_length`,
`counter` (our memory tasks' success counter, else None) and `close()`; every expert `reset(obs)` per
episode and `get_action(obs)`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Suite:
    name: str  # also the Hub card's dataset type
    sim_hz: int  # control steps per second
    robot_type: str  # LeRobot's robot_type
    state_names: tuple[str, ...]
    action_names: tuple[str, ...]
    object_names: tuple[str, ...]  # observation.environment_state's channels; empty: not recorded
    square: bool  # the default camera image is square (else 4:3, width = 4/3 height)


def _metaworld() -> Suite:
    from lingbot.sim import metaworld

    return Suite("metaworld", metaworld.SIM_HZ, "sawyer", metaworld.STATE_NAMES, metaworld.ACTION_NAMES,
                 metaworld.OBJECT_NAMES, True)


def _aloha() -> Suite:
    from lingbot.sim import aloha

    # LeRobot's aloha_sim_* datasets record no object poses: neither do we (the same layout).
    return Suite("aloha", aloha.SIM_HZ, aloha.ROBOT_TYPE, aloha.STATE_NAMES, aloha.ACTION_NAMES, (), False)


def camera_names(keys) -> tuple[str, ...]:
    """LeRobot image keys (`observation.images.<camera>`) -> the simulator's camera names."""
    return tuple(key.rsplit(".", 1)[-1] for key in keys)


def is_aloha(task: str) -> bool:
    return task.startswith("aloha-")


def suite_of(tasks) -> Suite:
    """The one suite of `tasks` (a task id or several); a mix is refused."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    kinds = {is_aloha(t) for t in tasks}
    if len(kinds) > 1:
        raise ValueError(f"tasks {', '.join(tasks)} mix ALOHA and MetaWorld: one suite per dataset")
    return _aloha() if kinds == {True} else _metaworld()


def task_names() -> list[str]:
    from lingbot.sim import aloha, metaworld

    return sorted([*metaworld.task_names(), *aloha.task_names()])


def task_description(task: str) -> str:
    """The instruction the policy is conditioned on, e.g. 'push-v3' -> 'push the puck to the goal'."""
    from lingbot.sim import aloha, metaworld

    return aloha.task_description(task) if is_aloha(task) else metaworld.task_description(task)


def image_width(task: str, height: int, width: int = 0) -> int:
    """The camera image's width: `width`, or the suite's own aspect at `height`."""
    return width or (height if suite_of(task).square else round(height * 4 / 3))


def make_env(task: str, height: int, cameras: tuple[str, ...], width: int = 0):
    """The task's environment rendering `cameras` at height x width (0: the suite's own aspect)."""
    if is_aloha(task):
        from lingbot.sim.aloha import AlohaEnv

        return AlohaEnv(task, height, cameras, image_width(task, height, width))
    from lingbot.sim.metaworld import MetaWorldEnv

    return MetaWorldEnv(task, height, cameras, image_width(task, height, width))


def expert_policy(task: str):
    if is_aloha(task):
        from lingbot.sim.aloha import AlohaExpert

        return AlohaExpert(task)
    from lingbot.sim.metaworld import expert_policy as metaworld_expert

    return metaworld_expert(task)
