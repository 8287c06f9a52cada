"""onnxruntime's optimized graph of a model file, kept on disk between sessions.

Opening a session of the demo model costs ~1.1 s on one CPU core, ~0.9 s of it onnxruntime's graph
optimizations (fusions, constant folding, the NCHWc layout); opening the graph it saved after
optimizing, with optimizations off, costs ~0.25 s and runs the same kernels on the same weights
(outputs equal, same speed: tests/test_graph_cache.py). Every worker of every run opens the
model, and on a local cluster that opening is the critical path to the first task, so the
optimized graph is kept (onnxruntime's own "offline optimization" mode, ``optimized_model_filepath``).

Only for sessions on the CPU provider alone: a graph optimized for a GPU provider is that
provider's (TensorRT keeps its own engine cache). The key holds everything the optimized graph
depends on: the model file's SHA-256, the onnxruntime version, and the CPU (the NCHWc layout
follows its vector width), so a cache in a home directory shared by unlike nodes stays right.
Files appear by atomic rename (workers opening the model at once each write their own temporary
file; the last rename wins, and they are the same bytes). A cache file that cannot be opened is
ignored and written again.

Where: ``$RTSMAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/rtsmap``, else ``~/.cache/rtsmap``;
``RTSMAP_CACHE_DIR=none`` turns the cache off. Any failure to write it only costs the time.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "RTSMAP_CACHE_DIR"
"""Environment variable naming the cache folder (``none``: no cache)."""

CPU_ONLY = ("CPUExecutionProvider",)
"""The provider list whose optimized graphs are kept."""


def cache_root() -> Path | None:
    """The cache folder (not created here), or None when the cache is turned off.

    Returns
    -------
    Path or None
        ``$RTSMAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/rtsmap``, else ``~/.cache/rtsmap``; None for
        ``RTSMAP_CACHE_DIR=none`` (any case) or an empty value.
    """
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "none") else Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rtsmap"


@functools.lru_cache(maxsize=1)
def _cpu_identity() -> str:
    """What the CPU's optimized graph depends on: the architecture and its feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, ARM
                    flags = line.split(":", 1)[-1].strip()
                    break
    except OSError:  # not Linux: the processor string is what there is
        flags = platform.processor()
    return f"{platform.machine()}|{flags}"


def graph_path(model_sha256: str, providers: Sequence[str], ort_version: str) -> Path | None:
    """Where the optimized graph of a model for these providers is kept.

    Parameters
    ----------
    model_sha256 : str
        The model file's SHA-256 (hex).
    providers : sequence of str
        The session's execution providers (onnxruntime names), in order.
    ort_version : str
        ``onnxruntime.__version__``.

    Returns
    -------
    Path or None
        ``<cache>/onnx-graphs/<sha256[:16]>-<key>.onnx``; None when the cache is off or the
        providers are not the CPU alone.
    """
    root = cache_root()
    if root is None or tuple(providers) != CPU_ONLY:
        return None
    key = hashlib.sha256(f"{model_sha256}|{ort_version}|{_cpu_identity()}".encode()).hexdigest()[:16]
    return root / "onnx-graphs" / f"{model_sha256[:16]}-{key}.onnx"


def staging_path(target: Path) -> Path | None:
    """A new temporary file beside ``target`` for onnxruntime to save the graph into; None when
    the folder cannot be made or written (the session then opens without saving)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        log.debug("optimized-graph cache %s not writable: %s", target.parent, exc)
        return None
    return Path(name)


def publish(staged: Path, target: Path) -> None:
    """Move a saved graph into place (atomically); on any failure drop it and go on."""
    try:
        if staged.stat().st_size == 0:  # onnxruntime saved nothing (it only saves what it optimized)
            raise OSError("empty")
        os.replace(staged, target)
    except OSError as exc:
        log.debug("optimized graph not kept at %s: %s", target, exc)
        staged.unlink(missing_ok=True)
