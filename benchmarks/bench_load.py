"""Benchmark of ``pipeline.load.load_chunk`` on the synthetic demo region.

For AOIs of 1x, 2x and 4x a base area it generates a demo region (or takes one), plans the
chunks, and loads up to ``--chunks`` of them, each in a fresh Python process so that the
figures of one load do not leak into the next. Per chunk it reports:

- seconds for ``load_chunk`` (imports and item parsing excluded);
- output MB/s (bytes of the float32 arrays returned / seconds) and MB read from files (the
  process's ``read_chars`` counter, i.e. bytes GDAL read, whether from disk or page cache);
- peak memory: the tracemalloc peak of the load (numpy reports its buffers to tracemalloc) and
  the process's peak resident set size (``VmHWM``; about 250 MB of it are the imports).

Chunks are loaded one at a time, so peak memory must not grow with the AOI; the summary says
whether it stayed within 10%.

Run: ``python -m benchmarks.bench_load`` (about 1-2 minutes), ``--help`` for options.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import click

from rtsmap.workflows.plan import PROFILES_DIR


def _items_by_modality(region: Path, profiles: dict, year: int) -> dict:
    import pystac

    items = list(pystac.ItemCollection.from_file(str(region / "stac" / "items.json")))
    return {
        m: [i for i in items if i.collection_id in p.collections and (not p.per_year or i.datetime.year == year)]
        for m, p in profiles.items()
    }


def _demo_profiles() -> dict:
    from rtsmap.pipeline.profiles import load_profile

    return load_profile(PROFILES_DIR / "demo.yaml").modalities


def measure_one(region: Path, chunk_id: str, year: int, tiles_per_chunk: int) -> dict:
    """Load one chunk in this process and measure it (called in a fresh subprocess).

    Parameters
    ----------
    region : Path
        Demo region directory (with ``aoi.geojson`` and ``stac/items.json``).
    chunk_id : str
        Chunk of the default grid to load.
    year : int
        Year to load.
    tiles_per_chunk : int
        Grid setting the chunk id was planned with.

    Returns
    -------
    dict
        ``chunk_id, seconds, output_bytes, read_bytes, tracemalloc_peak_bytes, peak_rss_bytes``.
    """
    import psutil

    from rtsmap.pipeline.aoi import read_aoi
    from rtsmap.pipeline.grid import GridSpec, chunk_by_id
    from rtsmap.pipeline.load import load_chunk

    profiles = _demo_profiles()
    items = _items_by_modality(region, profiles, year)
    aoi = read_aoi(region / "aoi.geojson")
    chunk = chunk_by_id(chunk_id, GridSpec(tiles_per_chunk=tiles_per_chunk), aoi.geometry)
    proc = psutil.Process()
    read_before = proc.io_counters().read_chars
    tracemalloc.start()
    start = time.perf_counter()
    stack = load_chunk(chunk, items, profiles, year)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    read_bytes = proc.io_counters().read_chars - read_before
    output = sum(a.nbytes for a in stack.data.values()) + sum(v.nbytes for v in stack.valid.values())
    return {
        "chunk_id": chunk_id,
        "seconds": seconds,
        "output_bytes": output,
        "read_bytes": read_bytes,
        "tracemalloc_peak_bytes": peak,
        "peak_rss_bytes": _peak_rss_bytes(),
    }


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process image (imports included).

    ``VmHWM`` rather than ``ru_maxrss``: on Linux ``ru_maxrss`` survives fork and exec, so a
    fresh subprocess would report its parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: best effort


def _measure_in_subprocess(region: Path, chunk_id: str, year: int, tiles_per_chunk: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "benchmarks.bench_load", "--tiles-per-chunk", str(tiles_per_chunk),
           "--measure-one", str(region), chunk_id, str(year)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Where demo regions are written (default: a temporary directory).")
@click.option("--region", "regions", type=click.Path(exists=True, path_type=Path), multiple=True,
              help="Take these existing demo regions instead of generating (repeatable).")
@click.option("--base-km", default=3.0, show_default=True, help="Side of the 1x AOI in km.")
@click.option("--factors", default="1,2,4", show_default=True, help="AOI area multipliers.")
@click.option("--chunks", "max_chunks", default=0, show_default=True,
              help="Chunks loaded per AOI (0: all).")
@click.option("--tiles-per-chunk", default=2, show_default=True,
              help="Grid chunk size in tiles (2: 480 px windows, so the AOIs span several chunks "
                   "quickly; 8: the production 1824 px windows).")
@click.option("--year", default=2022, show_default=True)
@click.option("--measure-one", nargs=3, default=None, hidden=True)
def bench_load_command(out_dir, regions, base_km, factors, max_chunks, tiles_per_chunk, year, measure_one):
    """Time and memory of loading chunks, for growing AOIs."""
    if measure_one:
        region, chunk_id, y = measure_one
        click.echo(json.dumps(measure_one_fn(Path(region), chunk_id, int(y), tiles_per_chunk)))
        return
    from rtsmap.pipeline.aoi import read_aoi
    from rtsmap.pipeline.grid import GridSpec, plan_grid

    if regions:
        todo = [(f"region {i}", Path(r)) for i, r in enumerate(regions)]
    else:
        from rtsmap.workflows.demo_region import generate_region

        root = out_dir or Path(tempfile.mkdtemp(prefix="rtsmap-bench-load-"))
        todo = []
        for f in (float(x) for x in factors.split(",")):
            side_m = base_km * 1000.0 * math.sqrt(f)
            start = time.perf_counter()
            generated = generate_region(root / f"x{f:g}", size_m=(side_m, side_m), years=(year,))
            click.echo(f"generated {f:g}x AOI ({side_m / 1000:.2f} km side) in {time.perf_counter() - start:.1f} s")
            todo.append((f"{f:g}x", generated.root))

    rows = []
    click.echo(f"{'AOI':>6} {'chunks':>6} {'chunk':>20} {'s':>6} {'out MB/s':>9} {'read MB':>8} "
               f"{'read MB/s':>9} {'peak MB':>8} {'peak RSS MB':>11}")
    for label, region in todo:
        chunks = plan_grid(read_aoi(region / "aoi.geojson").geometry, GridSpec(tiles_per_chunk=tiles_per_chunk))
        for chunk in chunks[: max_chunks or None]:
            m = _measure_in_subprocess(region, chunk.id, year, tiles_per_chunk)
            rows.append((label, m))
            mb = 1e6
            click.echo(
                f"{label:>6} {len(chunks):>6} {chunk.id:>20} {m['seconds']:6.2f} "
                f"{m['output_bytes'] / mb / m['seconds']:9.1f} {m['read_bytes'] / mb:8.1f} "
                f"{m['read_bytes'] / mb / m['seconds']:9.1f} {m['tracemalloc_peak_bytes'] / mb:8.1f} "
                f"{m['peak_rss_bytes'] / mb:11.1f}"
            )
    peaks = {}
    for label, m in rows:
        peaks.setdefault(label, []).append(m["tracemalloc_peak_bytes"])
    worst = {label: max(v) for label, v in peaks.items()}
    first = next(iter(worst.values()))
    growth = max(worst.values()) / first - 1.0
    click.echo(
        "peak memory per chunk by AOI: "
        + ", ".join(f"{k}: {v / 1e6:.1f} MB" for k, v in worst.items())
        + f" -> {'flat' if abs(growth) <= 0.10 else 'NOT flat'} ({growth:+.1%} vs the first AOI)"
    )


# the subprocess entry point, kept apart from the click option of the same name
measure_one_fn = measure_one


if __name__ == "__main__":
    bench_load_command()
