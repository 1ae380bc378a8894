"""Fan-out of shardable work past one machine: Prefect tasks on a Dask cluster (prefect-dask).

`fan_out(fn, jobs, cluster)` runs `fn(*job)` for every job as one Prefect task each, in a Prefect flow
whose task runner is Dask's: an existing scheduler (`cluster.address`, e.g. `tcp://10.0.0.5:8786` or a
Dask-Kubernetes / Coiled / dask-jobqueue scheduler) or a local cluster of `cluster.workers` processes.
Results come back in job order, so what the caller merges does not depend on which worker finished
first: the same inputs give the same outputs on 1 worker or N. Dask reschedules the job of a worker
that died; a Prefect retry covers a job that failed.

Why Dask (and not Ray): the work is many independent, file-backed jobs (a latent shard, an episode
rollout) whose results are small or written to a shared directory; Dask's scheduler and workers are
pure Python from PyPI (`distributed`), start on any machine with `dask worker tcp://...`, and exist
on every GPU cluster manager (dask-kubernetes, dask-jobqueue for SLURM/PBS, Coiled) with one
`LocalCUDACluster` per GPU node from `dask-cuda`. Ray would add its own object store and runtime,
which pays off for actor-style or GPU-memory-sharing work we do not have here.

Used by `collect` (one job per expert attempt), `cache_latents` (one job per shard) and `evaluate`
(one job per episode) when `cluster` is set in params.yaml; the default (no address, workers 0) keeps
them in one process / a local pool.
"""

from __future__ import annotations

from typing import Any, Callable

from lingbot.config import ClusterConfig
from lingbot.errors import LingbotError


def enabled(cluster: ClusterConfig) -> bool:
    return bool(cluster.address) or cluster.workers > 0


def active(cluster: ClusterConfig) -> ClusterConfig | None:
    """`cluster` when params set one up, else None (the stages' single-process path)."""
    return cluster if enabled(cluster) else None


def task_runner(cluster: ClusterConfig):
    """prefect-dask's DaskTaskRunner for `cluster`: its scheduler, or a local cluster of processes."""
    from prefect_dask import DaskTaskRunner

    if cluster.address:
        return DaskTaskRunner(address=cluster.address)
    if cluster.workers < 1:
        raise LingbotError("cluster: set cluster.address (a Dask scheduler) or cluster.workers >= 1")
    return DaskTaskRunner(cluster_kwargs={"n_workers": cluster.workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


def fan_out(fn: Callable, jobs: list[tuple], cluster: ClusterConfig, name: str) -> list[Any]:
    """[fn(*job) for job in jobs], each job a Prefect task on the Dask cluster; results in job order.

    `fn` must be importable by the workers (a module-level function of lingbot).
    """
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    job = task(fn, name=name, cache_policy=NO_CACHE, retries=cluster.retries)

    @flow(name=f"lingbot-{name}", task_runner=task_runner(cluster), log_prints=False)
    def run_all() -> list:
        futures = [job.submit(*args) for args in jobs]
        return [future.result() for future in futures]

    return run_all()
