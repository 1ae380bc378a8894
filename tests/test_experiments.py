"""The quality table over DVC experiments (`lingbot experiments`): runs grouped by recipe, pooled over seeds."""

import pytest


def _rev(rev, params, metrics):
    return {"rev": rev, "data": {"params": {"params.yaml": {"data": params}},
                                 "metrics": {f: {"data": d} for f, d in metrics.items()}}}


def _shown():
    """`dvc exp show --json` of a commit (seed 0) and three experiments on it: two training seeds (which
    did not rerun BC: its metrics are the commit's, carried along) and a lever (another recipe)."""
    base = {"finetune": {"steps": 100, "tasks": ["open the drawer"]}, "evaluate": {"seed": 100000}, "seed": 0}
    bc = {"success_rate": 1.0, "episodes": 50, "mean_episode_length": 40.5}

    def wm(wins):
        return {"reports/eval.json": {"success_rate": wins / 50, "episodes": 50, "mean_episode_length": 60 - wins / 10},
                "reports/baselines/bc.json": bc}

    def seeded(s):
        return {**base, "finetune": {**base["finetune"], "seed": s}, "pretrain": {"seed": s}}

    commit = _rev("a" * 40, base, wm(47)) | {"name": "main"}
    commit["experiments"] = [
        {"name": "seed-1", "revs": [_rev("b" * 40, seeded(1), wm(41))]},
        {"name": "seed-2", "revs": [_rev("c" * 40, seeded(2), wm(49))]},
        {"name": "longer", "revs": [_rev("d" * 40, {**base, "finetune": {**base["finetune"], "steps": 200}}, wm(30))]},
        {"name": "queued", "revs": [{"rev": "e" * 40, "data": None}]},
    ]
    workspace = _rev("workspace", seeded(2), wm(49))
    return [workspace, commit]


def test_runs_of_one_recipe_pool_over_their_seeds():
    from lingbot.eval.experiments import pool_experiments, runs_of

    runs = runs_of(_shown())
    assert [r["name"] for r in runs] == ["main", "seed-1", "seed-2", "longer"]  # no workspace, no queued run
    table = pool_experiments(runs, ["reports/eval.json", "reports/baselines/bc.json"])
    world = [t for t in table if t["metrics"] == "reports/eval.json"]
    assert [t["runs"] for t in world] == [["main", "seed-1", "seed-2"], ["longer"]]
    recipe = world[0]
    assert recipe["wins"] == [47, 41, 49] and recipe["episodes"] == [50, 50, 50]
    assert recipe["mean"] == pytest.approx(137 / 150, abs=1e-4) and recipe["std"] == pytest.approx(0.0833, abs=1e-4)
    assert (recipe["ci_low"], recipe["ci_high"]) == (pytest.approx(0.8574, abs=1e-4), pytest.approx(0.9487, abs=1e-4))
    assert recipe["seeds"][1] == {"finetune.seed": 1, "pretrain.seed": 1, "seed": 0}
    assert world[1]["std"] is None  # one run
    # BC's figures came along unchanged into the seed experiments: one run, not three.
    bc = [t for t in table if t["metrics"] == "reports/baselines/bc.json"]
    assert [t["runs"] for t in bc] == [["main"], ["longer"]]


def test_the_held_out_episodes_are_part_of_the_recipe():
    from lingbot.eval.experiments import is_training_seed, pool_experiments, runs_of

    assert is_training_seed("seed") and is_training_seed("bc.seed") and not is_training_seed("evaluate.seed")
    shown = _shown()
    shown[1]["experiments"][0]["revs"][0]["data"]["params"]["params.yaml"]["data"]["evaluate"] = {"seed": 200000}
    world = pool_experiments(runs_of(shown), ["reports/eval.json"])
    assert [t["runs"] for t in world] == [["main", "seed-2"], ["seed-1"], ["longer"]]  # other held-out episodes: not pooled with the rest
