"""Time and peak client memory of `rtsmap run` until its first task is submitted.

    python -m benchmarks.pan_arctic_catalog --out runs/pa --years 2017-2024
    python -m benchmarks.bench_first_task --catalog runs/pa --years 2024
    python -m benchmarks.bench_first_task --catalog runs/pa --years 2017-2024

Runs `rtsmap run` over the catalog folder's `aoi.geojson` (the 60-80 N band) with the
`planetary-computer` profile and the demo model in a child process, samples the child's resident
memory (client and scheduler: a LocalCluster's scheduler lives in the client process; worker
processes are not counted) until it logs `first task submitted`, then kills its process group:
the synthetic hrefs point at the real hosts and are never read.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def first_task(catalog: Path, years: str, out: Path) -> dict:
    """Run until the first submission; return seconds and the client's peak RSS in MiB."""
    import psutil

    cmd = [sys.executable, "-m", "rtsmap.workflows.cli", "run", "--aoi", str(catalog / "aoi.geojson"),
           "--catalog", str(catalog / "catalog"), "--profile", "planetary-computer", "--years", years,
           "--out", str(out), "--overwrite", "--workers", "1"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    me, peak, stop = psutil.Process(proc.pid), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], me.memory_info().rss)
            except psutil.Error:
                return
            stop.wait(0.2)

    threading.Thread(target=sample, daemon=True).start()
    seconds = None
    try:
        for line in proc.stderr:
            if "first task submitted" in line:
                seconds = time.monotonic() - started
                break
    finally:
        stop.set()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {"years": years, "first_task_s": seconds, "client_peak_rss_mib": round(peak[0] / 2**20)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", type=Path, required=True, help="folder written by benchmarks.pan_arctic_catalog")
    parser.add_argument("--years", default="2024")
    args = parser.parse_args(argv)
    figures = first_task(args.catalog, args.years, Path("/tmp") / f"rtsmap-first-task-{os.getpid()}.gpkg")
    print(figures)
    return figures


if __name__ == "__main__":
    main()
