"""Warming workers while a run plans: ``warm_workers`` opens the model in each worker's cache under
the key the plan's tasks look it up by, with the inference settings the tasks get
(``task_inference``).

Real components: a Dask LocalCluster (its worker in this process, so that the worker's model
cache can be inspected), onnxruntime on the shipped demo model, ``make_plan`` on the demo region.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from distributed import Client, LocalCluster

from rtsmap.workflows import detectors
from rtsmap.workflows.cluster import task_inference, warm_workers
from rtsmap.workflows.config import ClusterConfig, InferenceConfig


def test_local_workers_share_the_cores_only_when_onnxruntime_would_take_them_all():
    cores = os.cpu_count() or 1
    two = ClusterConfig(kind="local", n_workers=2)
    assert task_inference(InferenceConfig(threads=0), two).threads == max(1, cores // 2)
    assert task_inference(InferenceConfig(threads=3), two).threads == 3
    remote = dataclasses.replace(two, kind="address", address="tcp://127.0.0.1:8786")
    assert task_inference(InferenceConfig(threads=0), remote).threads == 0


def test_a_warmed_worker_has_the_model_the_tasks_ask_for(demo_plan):
    plan = demo_plan((2021,))
    config, task = plan.config, plan.tasks[0]
    detectors._DETECTORS.clear()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        futures = warm_workers(client, str(config.model), task_inference(config.inference, config.cluster))
        assert len(futures) == 1
        assert [f.result() for f in futures] == ["CPUExecutionProvider"]
    key = (task.model_path, task.model_sha256, tuple(task.inference.providers))
    assert list(detectors._DETECTORS) == [key]
    # The task finds it there: no second session is opened.
    warmed = detectors._DETECTORS[key]
    assert detectors.get_detector(task.model_path, task.model_sha256, task.inference) is warmed


def test_warm_up_reports_a_model_it_cannot_open_instead_of_raising(tmp_path):
    # A raising task would print its traceback on the worker's stderr; the plan reports the
    # same problem as one line.
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx file")
    message = detectors.warm_up(str(bad), InferenceConfig(threads=1))
    assert message.startswith("error: ModelError")


def test_warm_up_imports_the_task_code_while_the_model_opens():
    # In a fresh process, as on a new worker: after the warm-up the first task finds its code
    # imported and the model open.
    code = (
        "import sys\n"
        "from rtsmap.workflows.config import DEMO_MODEL, InferenceConfig\n"
        "from rtsmap.workflows.detectors import _DETECTORS, warm_up\n"
        "assert 'rtsmap.workflows.tasks' not in sys.modules\n"
        "print(warm_up(str(DEMO_MODEL), InferenceConfig(threads=1)), len(_DETECTORS),\n"
        "      'rtsmap.workflows.tasks' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["CPUExecutionProvider", "1", "True"]


def _worker_state() -> tuple[bool, int]:
    import sys

    from rtsmap.workflows import detectors as worker_detectors

    return "rtsmap.workflows.tasks" in sys.modules, len(worker_detectors._DETECTORS)


def test_forked_workers_have_the_task_code_and_no_session_of_this_process():
    # Real LocalClusters with worker processes: a forked worker has what this process imported
    # (the task code) and none of its onnxruntime sessions; a spawned one imports on its own.
    import rtsmap.workflows.tasks  # noqa: F401 - as workflows.run has before a run starts its cluster
    from rtsmap.pipeline.model_file import file_sha256
    from rtsmap.workflows.cluster import local_start_method, open_cluster
    from rtsmap.workflows.config import DEMO_MODEL

    detectors.get_detector(str(DEMO_MODEL), file_sha256(DEMO_MODEL), InferenceConfig(threads=1))
    assert detectors._DETECTORS
    forked = ClusterConfig(kind="local", n_workers=1, worker_start="fork", timeout_s=60)
    with open_cluster(forked) as client:
        assert list(client.run(_worker_state).values()) == [(True, 0)]
    with open_cluster(dataclasses.replace(forked, worker_start="spawn")) as client:
        assert list(client.run(_worker_state).values()) == [(False, 0)]
    assert local_start_method(dataclasses.replace(forked, worker_start="auto")) in ("fork", "spawn")
    # GPU workers are spawned: a CUDA context of this process would not survive the fork.
    assert local_start_method(dataclasses.replace(forked, worker_start="auto", gpus_per_worker=1)) == "spawn"
