"""The success metrics every evaluation reports: a rate with its 95% Wilson interval, per run and pooled
over runs (seeds). Closed-loop rollouts (`lingbot/sim/evaluate.py`, `lingbot/sim/lerobot_env.py`), the
baselines and the table over DVC experiments (`lingbot/eval/experiments.py`) all count successes here."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (sound at 0/n and n/n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def success_metrics(successes: list[bool], prefix: str = "") -> dict:
    """`{prefix}success_rate`, its Wilson interval (4 decimals) and the episode count of one set of episodes."""
    wins, n = sum(bool(s) for s in successes), len(successes)
    low, high = wilson_interval(wins, n)
    return {f"{prefix}success_rate": wins / max(1, n), f"{prefix}success_ci_low": round(low, 4),
            f"{prefix}success_ci_high": round(high, 4), f"{prefix}episodes": n}


def pooled_runs(runs: list[dict]) -> dict:
    """Runs of one recipe (each a dict with `success_rate` and `episodes`, e.g. one per chain seed):
    wins per run, the mean rate, its standard deviation across runs (None for one run), the range,
    and the Wilson interval of all their episodes pooled."""
    rates = [r["success_rate"] for r in runs]
    wins = [round(r["success_rate"] * r["episodes"]) for r in runs]
    low, high = wilson_interval(sum(wins), sum(r["episodes"] for r in runs))
    mean = sum(rates) / len(rates)
    std = math.sqrt(sum((x - mean) * (x - mean) for x in rates) / (len(rates) - 1)) if len(rates) > 1 else None
    return {"wins": wins, "mean": mean, "std": std, "min": min(rates), "max": max(rates),
            "ci_low": low, "ci_high": high}
