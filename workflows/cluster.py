"""Dask clusters for `rtsmap run`: local, an existing scheduler, SLURM/PBS, Kubernetes.

HPC clusters are configured the way Dask users already configure them: dask-jobqueue reads
queue, account, cores, memory, walltime and job directives from ``~/.config/dask/jobqueue.yaml``
(or ``DASK_JOBQUEUE__SLURM__*`` variables). rtsmap adds only what it must: the ``GPU`` worker
resource that inference tasks ask for, and a worker lifetime so workers retire before the
batch walltime and their replacement jobs carry on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

from distributed import Client, LocalCluster

from rtsmap.pipeline.errors import ConfigError
from rtsmap.workflows.config import ClusterConfig, InferenceConfig

log = logging.getLogger(__name__)


def local_worker_count(config: ClusterConfig) -> int:
    """Worker processes for a LocalCluster: the configured number, else one per core (at most 4)."""
    if config.n_workers > 0:
        return config.n_workers
    return max(1, min(4, os.cpu_count() or 1))


def task_inference(inference: InferenceConfig, cluster: ClusterConfig) -> InferenceConfig:
    """The inference settings the tasks get: ``inference``, with each local worker's share of the
    cores as onnxruntime's threads when it leaves them to onnxruntime (0), because onnxruntime's
    default (every core) in each of several local workers oversubscribes the machine."""
    if cluster.kind == "local" and inference.threads == 0:
        share = max(1, (os.cpu_count() or 1) // local_worker_count(cluster))
        return dataclasses.replace(inference, threads=share)
    return inference


def warm_workers(client: Client, model_path: str, inference: InferenceConfig) -> list:
    """Have every worker of ``client`` import the task code and open the model now (a task
    each, :func:`rtsmap.workflows.detectors.warm_up`), so a run can plan meanwhile instead of its
    first task doing it (about 3 s on a 2-core machine: imports, then onnxruntime's session).

    Returns
    -------
    list of distributed.Future
        Keep them until the run's tasks are submitted (a released future is cancelled). Their
        errors need no handling: the first task meets the same one and reports it.
    """
    from rtsmap.workflows.detectors import warm_up

    workers = list(client.scheduler_info(n_workers=-1).get("workers", {}))
    return [client.submit(warm_up, str(model_path), inference, workers=[address], allow_other_workers=False,
                          pure=False) for address in workers]


def settle(futures: list, timeout: float = 120.0) -> None:
    """Wait until ``futures`` are finished (or ``timeout`` seconds pass), whatever their outcome."""
    from distributed import wait

    try:
        wait(futures, timeout=timeout)
    except Exception:  # noqa: BLE001 - a late or failed warm-up only costs the first task the time
        pass


def _quiet_distributed_logs() -> None:
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


def quiet_workers(client: Client) -> None:
    """Keep a local cluster's workers from logging while it closes: a worker whose heartbeat meets
    the scheduler already gone prints a traceback on the run's terminal (seen once in ~10 runs
    with the cluster closing during the finish) that says nothing about the run."""
    with contextlib.suppress(Exception):
        client.run(_quiet_distributed_logs)


def close_in_background(client: Client) -> threading.Thread:
    """Close ``client`` and the cluster it started on a thread of their own; return the thread.

    For a run that needs the cluster no more while it writes (closing a local cluster takes
    ~0.4 s). Both closes are idempotent, so leaving :func:`open_cluster` afterwards, in the
    run's own thread (where the client's context variable must be reset), finds them closed.
    A failure to close is logged, as leaving :func:`open_cluster` would raise it.
    """

    def close() -> None:
        try:
            cluster = getattr(client, "cluster", None)
            if isinstance(cluster, LocalCluster):
                quiet_workers(client)
            client.close()
            if cluster is not None:
                cluster.close()
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("closing the Dask cluster: %s", exc)

    thread = threading.Thread(target=close, name="rtsmap-close-cluster", daemon=True)
    thread.start()
    return thread


def worker_extra_args(config: ClusterConfig) -> list[str]:
    """Arguments for `dask worker` in batch jobs: GPU resource and lifetime."""
    args: list[str] = []
    if config.gpus_per_worker > 0:
        args += ["--resources", f"GPU={config.gpus_per_worker}"]
    if config.lifetime:
        # Stagger so that workers of one job do not all leave at the same moment.
        args += ["--lifetime", config.lifetime, "--lifetime-stagger", "2m"]
    return args


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Processes started in this block ignore SIGINT (an ignored signal stays ignored across exec).

    Ctrl-C reaches every process of the terminal's group. The main process turns it into a clean
    shutdown of the cluster; worker processes would otherwise each print a KeyboardInterrupt
    traceback. The price: a Ctrl-C during the few seconds the workers start is ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def local_start_method(config: ClusterConfig) -> str:
    """The multiprocessing start method of a local cluster's first workers (``fork`` or ``spawn``)."""
    if config.worker_start != "auto":
        return config.worker_start
    if config.gpus_per_worker > 0:
        return "spawn"  # a CUDA context this process may hold does not survive a fork
    return "fork" if sys.platform.startswith("linux") else "spawn"  # macOS' system libraries break under fork


@contextlib.contextmanager
def _first_workers_start(config: ClusterConfig) -> Iterator[None]:
    """Start the workers made in this block by :func:`local_start_method`.

    Fork: a worker is a copy of this process, which has imported the task code already
    (``workflows.run`` imports it), so it starts in ~0.1 s instead of importing for ~1.5 s
    (measured on 2 cores), and its first task waits for nothing but the model opening. A
    local cluster starts before the plan, when the only other thread is Dask's event loop, so no
    lock another thread holds is copied. Workers Dask restarts later (after a crash) are
    spawned: the run has more threads by then. Nothing a task uses crosses the fork: the
    detector cache is emptied in the child (``workflows.detectors``).
    """
    import dask

    with dask.config.set({"distributed.worker.multiprocessing-method": local_start_method(config)}):
        yield


def jobqueue_cluster(config: ClusterConfig):
    """A dask-jobqueue SLURMCluster or PBSCluster for ``config`` (no jobs submitted yet).

    Everything else (cores, memory, queue, walltime, scheduler host, job directives) comes from
    Dask's ``jobqueue.<kind>`` configuration; rtsmap's worker arguments are appended to the
    configured ``worker-extra-args``.

    Raises
    ------
    ConfigError
        When dask-jobqueue is missing or the cluster is not configured (cores, memory).
    """
    try:
        import dask
        import dask_jobqueue
    except ImportError:
        raise ConfigError(f"cluster.kind={config.kind} needs dask-jobqueue: pip install 'rtsmap[hpc]'") from None
    cls = dask_jobqueue.SLURMCluster if config.kind == "slurm" else dask_jobqueue.PBSCluster
    # Passing worker_extra_args replaces the configured ones, so join them.
    configured = list(dask.config.get(f"jobqueue.{config.kind}.worker-extra-args", None) or [])
    try:
        return cls(worker_extra_args=configured + worker_extra_args(config))
    except ValueError as exc:
        # dask-jobqueue raises ValueError when cores/memory are not configured; its message
        # goes on over several lines with a Python example, the first line says what is missing.
        reason = str(exc).splitlines()[0].removesuffix(", for example:")
        raise ConfigError(
            f"cannot configure the {config.kind} cluster: {reason} "
            f"(set jobqueue.{config.kind}.cores and .memory in ~/.config/dask/jobqueue.yaml)"
        ) from None


def _jobqueue_cluster(config: ClusterConfig):
    cluster = jobqueue_cluster(config)
    if config.lifetime:
        # Adaptive with a fixed size: jobs whose workers retired are replaced.
        cluster.adapt(minimum_jobs=config.jobs, maximum_jobs=config.jobs)
    else:
        cluster.scale(jobs=config.jobs)
    return cluster


def kubernetes_options(config: ClusterConfig) -> dict:
    """Keyword arguments for dask-kubernetes' ``KubeCluster`` beyond name and worker count.

    With ``gpus_per_worker`` the worker pods ask Kubernetes for the GPUs (``nvidia.com/gpu``)
    and each worker advertises them as the Dask resource ``GPU`` that inference tasks ask for,
    with a thread per task that may share a GPU, as batch-job workers do (:func:`worker_extra_args`).
    """
    options: dict = {}
    if config.gpus_per_worker > 0:
        options["resources"] = {"limits": {"nvidia.com/gpu": str(config.gpus_per_worker)}}
        threads = max(config.threads_per_worker, config.tasks_per_gpu)
        options["worker_command"] = ["dask-worker", "--nthreads", str(threads), *worker_extra_args(config)]
    return options


def _kubernetes_cluster(config: ClusterConfig):
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise ConfigError("cluster.kind=kubernetes needs dask-kubernetes: pip install 'rtsmap[kubernetes]'") from None
    return KubeCluster(name="rtsmap", n_workers=config.jobs, **kubernetes_options(config))


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
                with _children_ignore_sigint(), _first_workers_start(config):
                    cluster = LocalCluster(
                        n_workers=local_worker_count(config),
                        # GPU workers run tasks_per_gpu tasks at once (see run.execute).
                        threads_per_worker=max(
                            config.threads_per_worker, config.tasks_per_gpu if config.gpus_per_worker else 1
                        ),
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
            if isinstance(cluster, LocalCluster) and client.status == "running":
                quiet_workers(client)
    finally:
        if cluster is not None:
            cluster.close()
