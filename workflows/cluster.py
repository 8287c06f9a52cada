"""Dask clusters for `rtsmap run`: local, an existing scheduler, SLURM/PBS, Kubernetes.

HPC clusters are configured the way Dask users already configure them: dask-jobqueue reads
queue, account, cores, memory, walltime and job directives from ``~/.config/dask/jobqueue.yaml``
(or ``DASK_JOBQUEUE__SLURM__*`` variables). rtsmap adds only what it must: the ``GPU`` worker
resource that inference tasks ask for, and a worker lifetime so workers retire before the
batch walltime and their replacement jobs carry on.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from distributed import Client, LocalCluster

from pipeline.errors import ConfigError
from workflows.config import ClusterConfig

log = logging.getLogger(__name__)


def local_worker_count(config: ClusterConfig) -> int:
    """Worker processes for a LocalCluster: the configured number, else one per core (at most 4)."""
    if config.n_workers > 0:
        return config.n_workers
    return max(1, min(4, os.cpu_count() or 1))


def worker_extra_args(config: ClusterConfig) -> list[str]:
    """Arguments for `dask worker` in batch jobs: GPU resource and lifetime."""
    args: list[str] = []
    if config.gpus_per_worker > 0:
        args += ["--resources", f"GPU={config.gpus_per_worker}"]
    if config.lifetime:
        # Stagger so that workers of one job do not all leave at the same moment.
        args += ["--lifetime", config.lifetime, "--lifetime-stagger", "2m"]
    return args


def _jobqueue_cluster(config: ClusterConfig):
    try:
        import dask_jobqueue
    except ImportError:
        raise ConfigError(f"cluster.kind={config.kind} needs dask-jobqueue: pip install 'rtsmap[hpc]'") from None
    cls = dask_jobqueue.SLURMCluster if config.kind == "slurm" else dask_jobqueue.PBSCluster
    try:
        cluster = cls(worker_extra_args=worker_extra_args(config))
    except ValueError as exc:
        # dask-jobqueue raises ValueError when cores/memory are not configured.
        raise ConfigError(
            f"cannot configure the {config.kind} cluster: {exc} (set it in ~/.config/dask/jobqueue.yaml)"
        ) from None
    if config.lifetime:
        # Adaptive with a fixed size: jobs whose workers retired are replaced.
        cluster.adapt(minimum_jobs=config.jobs, maximum_jobs=config.jobs)
    else:
        cluster.scale(jobs=config.jobs)
    return cluster


def _kubernetes_cluster(config: ClusterConfig):
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise ConfigError("cluster.kind=kubernetes needs dask-kubernetes: pip install 'rtsmap[kubernetes]'") from None
    cluster = KubeCluster(name="rtsmap", n_workers=config.jobs)
    return cluster


@contextlib.contextmanager
def open_cluster(config: ClusterConfig) -> Iterator[Client]:
    """Start (or connect to) the cluster the configuration names and yield a client.

    Raises
    ------
    ConfigError
        When a scheduler cannot be reached, or no worker arrives within ``config.timeout_s``.
    """
    cluster = None
    try:
        if config.kind == "address":
            try:
                client = Client(config.address, timeout=config.timeout_s)
            except (OSError, TimeoutError) as exc:
                raise ConfigError(f"cannot reach the Dask scheduler at {config.address}: {exc}") from None
        else:
            if config.kind == "local":
                resources = {"GPU": config.gpus_per_worker} if config.gpus_per_worker else None
                cluster = LocalCluster(
                    n_workers=local_worker_count(config),
                    threads_per_worker=config.threads_per_worker,
                    processes=True,
                    memory_limit=config.memory_limit,
                    dashboard_address=":0",
                    resources=resources,
                )
            elif config.kind in ("slurm", "pbs"):
                cluster = _jobqueue_cluster(config)
            else:
                cluster = _kubernetes_cluster(config)
            client = Client(cluster)
        try:
            client.wait_for_workers(1, timeout=config.timeout_s)
        except TimeoutError:
            client.close()
            raise ConfigError(
                f"no Dask worker joined within {config.timeout_s:g} s ({config.kind} cluster); "
                "check the queue or raise cluster.timeout_s"
            ) from None
        with client:
            yield client
    finally:
        if cluster is not None:
            cluster.close()
