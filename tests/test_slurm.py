"""HPC clusters: the demo region through a real SLURM (workers are sbatch jobs), and PBS job scripts.

The SLURM test needs a running controller: `.ci/start-slurm` starts a single-node cluster
(munged, slurmctld, slurmd) on this host; without one the test is skipped and says so. PBS has no
server here: its test checks the job script dask-jobqueue would submit.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from io import StringIO
from pathlib import Path

import dask
import pytest

from test_run import assert_one_fragment_each, assert_same_inventory, model_path, reference, run_config  # noqa: F401
from rtsmap.workflows.cluster import jobqueue_cluster, worker_extra_args
from rtsmap.workflows.config import ClusterConfig

# Imported before any dask.config.set: the import adds jobqueue's defaults to Dask's config, and a
# set() block that was opened before them would remove them again on exit.
pytest.importorskip("dask_jobqueue", reason="the HPC tests need dask-jobqueue: pip install 'rtsmap[hpc]'")


def slurm_answers() -> str | None:
    """None when `sinfo` answers with an available partition, else why not."""
    if shutil.which("sinfo") is None:
        return "sinfo not found"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%a %T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 10 s"
    if proc.returncode != 0:
        return f"sinfo failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}"
    if not any(line.startswith("up") and not line.endswith(("down", "drain")) for line in proc.stdout.splitlines()):
        return f"no SLURM partition is up: {proc.stdout.strip()!r}"
    return None


def jobqueue_settings(kind: str, tmp_path: Path) -> dict:
    """A small job (1 core, 2 GiB, 10 minutes) whose scheduler listens on 127.0.0.1 only."""
    return {
        f"jobqueue.{kind}.cores": 1,
        f"jobqueue.{kind}.memory": "2GiB",
        f"jobqueue.{kind}.processes": 1,
        f"jobqueue.{kind}.walltime": "00:10:00",
        f"jobqueue.{kind}.log-directory": str(tmp_path / "jobs"),
        f"jobqueue.{kind}.local-directory": str(tmp_path / "dask"),
        f"jobqueue.{kind}.scheduler-options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
    }


# Decided at collection, so that a machine without SLURM does not build the fixtures first.
NO_SLURM = slurm_answers()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(
    NO_SLURM is not None,
    reason=f"no SLURM here ({NO_SLURM}); start a single-node cluster with `sudo .ci/start-slurm`",
)
def test_demo_region_on_slurm(demo_region, model_path, reference, tmp_path):  # noqa: F811
    """Two SLURM jobs run the workers; the inventory equals the local run's."""
    from rtsmap.workflows.run import execute, finish, make_plan

    partition = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()[0]
    settings = jobqueue_settings("slurm", tmp_path)
    settings["jobqueue.slurm.queue"] = partition.rstrip("*")
    cluster_config = ClusterConfig(kind="slurm", jobs=2, timeout_s=120)
    config = run_config(demo_region, model_path, tmp_path / "inv.gpkg", cluster=cluster_config)
    with dask.config.set(settings):
        from rtsmap.workflows.cluster import open_cluster

        plan = make_plan(config)
        with open_cluster(config.cluster) as client:
            client.wait_for_workers(2, timeout=120)
            script = client.cluster.job_script()
            job_ids = [job.job_id for job in client.cluster.workers.values()]
            # The workers really are SLURM jobs, running now.
            queue = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True).stdout
            running = dict(line.split() for line in queue.splitlines())
            assert all(running.get(j) == "RUNNING" for j in job_ids), (job_ids, queue)
            summary = execute(plan, client, stream=StringIO())
            workers = {w.split(":")[-1] for w in summary.workers}
    result = finish(plan, started=time.monotonic(), started_iso="")

    assert "#SBATCH" in script and "127.0.0.1" in script
    assert summary.statuses == {"processed": 8} and summary.chunk_years == 8
    assert len(workers) >= 1
    assert not result.partial
    assert_one_fragment_each(config.work_dir, n_chunks=4)
    assert_same_inventory(Path(config.out), reference[0])
    # The jobs leave when the cluster closes.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
        if not set(job_ids) & set(queue):
            break
        time.sleep(1)
    assert not set(job_ids) & set(queue), queue


def test_pbs_job_script(tmp_path):
    """The PBS job script carries the GPU worker resource and the staggered lifetime."""
    config = ClusterConfig(kind="pbs", gpus_per_worker=1, lifetime="55m")
    settings = jobqueue_settings("pbs", tmp_path)
    settings["jobqueue.pbs.resource-spec"] = "select=1:ncpus=1:ngpus=1:mem=2GB"
    settings["jobqueue.pbs.worker-extra-args"] = ["--nthreads", "1"]
    with dask.config.set(settings):
        cluster = jobqueue_cluster(config)
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
    assert script.startswith("#!/usr/bin/env bash")
    assert "#PBS -l select=1:ncpus=1:ngpus=1:mem=2GB" in script
    assert "#PBS -l walltime=00:10:00" in script
    command = next(line for line in script.splitlines() if "distributed.cli.dask_worker" in line)
    assert "tcp://127.0.0.1:" in command
    assert " ".join(worker_extra_args(config)) in command
    assert "--resources GPU=1" in command and "--lifetime 55m --lifetime-stagger 2m" in command
    assert "--nthreads 1" in command  # the configured worker arguments are kept


def test_jobqueue_not_configured_is_one_clear_error(tmp_path):
    """No cores/memory configured for SLURM: a ConfigError that says where to set them."""
    from rtsmap.pipeline.errors import ConfigError

    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):
        with pytest.raises(ConfigError, match="cannot configure the slurm cluster: .*cores.*jobqueue.yaml") as info:
            jobqueue_cluster(ClusterConfig(kind="slurm"))
    assert "\n" not in str(info.value)
