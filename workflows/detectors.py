"""A worker process's open models: one onnxruntime session per model file, hash and providers.

Light on purpose: :func:`warm_up` is sent to each worker while the run plans, and what it imports
before the model starts opening delays the first task. The task code (``workflows.tasks``: odc-stac,
xarray, pandas, ~0.9 s on a 2-core machine) is imported while onnxruntime builds the session on
another thread (it releases the GIL while it does), instead of one after the other.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from rtsmap.workflows.config import InferenceConfig

if TYPE_CHECKING:
    from rtsmap.pipeline.infer import Detector

_DETECTORS: dict[tuple[str, str, tuple[str, ...]], Detector] = {}
_LOCK = threading.Lock()  # one session per key even when a task and a warm-up ask at once


def _forget_after_fork() -> None:
    """In a forked worker: no session of the parent (its thread pool did not cross the fork)."""
    global _LOCK
    _DETECTORS.clear()
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def get_detector(path: str, sha256: str, inference: InferenceConfig) -> Detector:
    """The worker process's detector for this model, opened on first use.

    Raises
    ------
    ModelError
        When the model cannot be opened (``pipeline.infer.load_model``).
    """
    key = (path, sha256, tuple(inference.providers))
    with _LOCK:
        if key not in _DETECTORS:
            from rtsmap.pipeline.infer import load_model

            _DETECTORS[key] = load_model(
                path,
                providers=tuple(inference.providers),
                require_gpu=inference.require_gpu,
                intra_op_threads=inference.threads,
            )
        return _DETECTORS[key]


def _open(model_path: str, inference: InferenceConfig) -> Detector:
    from rtsmap.pipeline.model_file import file_sha256

    return get_detector(model_path, file_sha256(model_path), inference)


def warm_up(model_path: str, inference: InferenceConfig) -> str:
    """Open the model in this worker process's cache while importing the task code, as the first
    task would do one after the other: a run does it while it plans (``cluster.warm_workers``).

    Returns
    -------
    str
        The execution providers in use, comma-joined; or ``error: ...`` when the model cannot
        be opened. Never raises: a failed task would print its traceback on the worker's
        stderr, and the plan (or the first task) reports the same problem as one line.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="open-model") as pool:
        opening = pool.submit(_open, model_path, inference)
        try:
            import rtsmap.workflows.tasks  # noqa: F401 - the task code, while the model opens
        except Exception:  # noqa: BLE001 - the first task meets it and reports it
            pass
        try:
            detector = opening.result()
        except Exception as exc:  # noqa: BLE001 - see Returns
            return f"error: {type(exc).__name__}: {exc}"
    return ",".join(detector.providers)
