"""The quality table over DVC experiments: each recipe's success pooled over its seeds.

A sweep over seeds is a set of DVC experiments (`dvc exp run --queue -S '++finetune.seed=1' ...`,
docs/experiments.md); `dvc exp show` lists one row per run. `pool_experiments` groups those rows by
recipe (every param equal except the training seeds: params named `seed` or `*.seed`, but not
`evaluate.seed`, which picks the held-out episodes) and pools each metrics file's success over the
group's runs (`lingbot.eval.metrics.pooled_runs`: wins per run, mean, std, Wilson interval of all
episodes). A row whose results from one file equal another row's in the group, to every number, is
the same run carried into a later commit or experiment (a baseline that the experiment did not rerun)
and is counted once.
"""

from __future__ import annotations

from lingbot.eval.metrics import pooled_runs


def is_training_seed(param: str) -> bool:
    return (param == "seed" or param.endswith(".seed")) and param != "evaluate.seed"


def runs_of(shown: list[dict]) -> list[dict]:
    """`dvc exp show --json` -> one {name, params (dotted keys), metrics {file: {name: value}}} per
    commit and per experiment on it (not the workspace: its files are the last run, listed as itself)."""
    def flat(node: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in node.items():
            out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
        return out

    def run(name: str, data: dict | None) -> list[dict]:
        if not data:  # a failed or queued experiment
            return []
        params = {}
        for file in (data.get("params") or {}).values():
            params |= flat((file or {}).get("data") or {})
        metrics = {path: flat((file or {}).get("data") or {}) for path, file in (data.get("metrics") or {}).items()}
        return [{"name": name, "params": params, "metrics": metrics}]

    runs = []
    for commit in shown:
        if commit.get("rev") != "workspace":
            runs += run(commit.get("name") or commit["rev"][:7], commit.get("data"))
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                runs += run(exp.get("name") or rev.get("name") or rev["rev"][:7], rev.get("data"))
    return runs


def pool_experiments(runs: list[dict], metrics_files: list[str]) -> list[dict]:
    """One entry per (recipe, metrics file) that has results: the file, the recipe's runs and their
    training seeds, and the pooled figures (`runs_of` gives `runs`)."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        recipe = repr(sorted((k, repr(v)) for k, v in run["params"].items() if not is_training_seed(k)))
        groups.setdefault(recipe, []).append(run)
    table = []
    for members in groups.values():
        for name in metrics_files:
            rows, seen = [], []
            for run in members:
                values = run["metrics"].get(name) or {}
                rate, episodes = values.get("success_rate"), values.get("episodes")
                if not isinstance(rate, (int, float)) or not isinstance(episodes, (int, float)) or values in seen:
                    continue
                seen.append(values)
                rows.append({"name": run["name"], "success_rate": rate, "episodes": int(episodes),
                             "seeds": {k: v for k, v in run["params"].items() if is_training_seed(k)}})
            if rows:
                pooled = pooled_runs(rows)
                table.append({"metrics": name, "runs": [r["name"] for r in rows], "seeds": [r["seeds"] for r in rows],
                              "wins": pooled["wins"], "episodes": [r["episodes"] for r in rows],
                              "mean": round(pooled["mean"], 4),
                              "std": None if pooled["std"] is None else round(pooled["std"], 4),
                              "ci_low": round(pooled["ci_low"], 4), "ci_high": round(pooled["ci_high"], 4)})
    return table
