"""Benchmark of ``pipeline.load.load_chunk`` on the synthetic demo region.

For AOIs of 1x, 2x and 4x a base area it generates a demo region (or takes one), plans the
chunks, and loads up to ``--chunks`` of them for each of ``--years``, each chunk-year in a fresh
Python process so that the figures of one load do not leak into the next. Per chunk-year it
reports:

- seconds for ``load_chunk`` (imports and item parsing excluded), in all and per modality
  (optical, SAR, DEM: each modality is loaded by its own ``load_chunk`` call, one after the
  other, so the total is their sum);
- output MB/s (bytes of the float32 arrays returned / seconds) and MB read from files (the
  process's ``read_chars`` counter, i.e. bytes GDAL read, whether from disk or page cache);
- peak memory: the tracemalloc peak of the load (numpy reports its buffers to tracemalloc) and
  the process's peak resident set size (``VmHWM``; about 250 MB of it are the imports).

``--extra-items N`` adds N copies of each optical item, ranked after the real ones (higher cloud
cover), as a chunk with persistent cloud would have: the mosaic then reads every item, which
shows the per-item cost. ``--profile`` runs the loads under cProfile and splits their time into
odc-stac set-up (``odc.stac.load`` before any array exists: parsing, planning), odc's output
fill (allocating, filling with nodata, pasting reads), GDAL reads and reprojection (odc-loader's
``rio_read``), our mosaic (``_add_item``) and terrain derivatives.

Chunks are loaded one at a time, so peak memory must not grow with the AOI; the summary says
whether it stayed within 10%.

Run from the checkout: ``.venv/bin/python -m benchmarks.bench_load`` (about 1-2 minutes),
``--help`` for options; e.g. production-size chunks of an existing region:
``.venv/bin/python -m benchmarks.bench_load --region REGION --tiles-per-chunk 8 --years 2021,2022``.
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


def _with_extra_items(items: dict, extra: int) -> dict:
    """Each optical item plus ``extra`` copies ranked after all real items (cloud cover + 100)."""
    if extra <= 0 or "optical" not in items:
        return items
    copies = []
    for item in items["optical"]:
        for n in range(extra):
            copy = item.clone()
            copy.id = f"{item.id}-copy{n}"
            copy.properties["eo:cloud_cover"] = float(item.properties.get("eo:cloud_cover") or 0.0) + 100.0 + n
            copies.append(copy)
    return {**items, "optical": items["optical"] + copies}


def _profile_buckets(profiler) -> dict:
    """Seconds of the profiled loads by part (cumulative times of the functions named)."""
    import pstats

    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)

    def cumulative(path_part: str, name: str) -> float:
        return sum(v[3] for k, v in stats.items() if path_part in k[0] and k[2] == name)

    odc_load = cumulative("odc/stac/_stac_load.py", "load")
    loading = cumulative("odc/loader/_builder.py", "chunked_load")
    reads = cumulative("odc/loader/_rio.py", "rio_read")
    return {
        # parsing items, planning, choosing the geobox and tiles (before any array exists)
        "odc_stac_setup_s": odc_load - loading,
        # allocating the output, filling it with nodata, pasting each read into it
        "odc_fill_s": loading - reads,
        # opening the files and GDAL's windowed read + reprojection
        "gdal_read_s": reads,
        "odc_stac_calls": sum(v[1] for k, v in stats.items() if "odc/stac/_stac_load.py" in k[0] and k[2] == "load"),
        "mosaic_s": cumulative("pipeline/load.py", "_add_item"),
        "terrain_s": cumulative("pipeline/terrain.py", "terrain_derivatives"),
        "total_s": cumulative("pipeline/load.py", "load_chunk"),
    }


def measure_one(region: Path, chunk_id: str, year: int, tiles_per_chunk: int, extra_items: int = 0,
                profile: bool = False) -> dict:
    """Load one chunk-year in this process and measure it (called in a fresh subprocess).

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
    extra_items : int
        Copies of each optical item added after the real ones (see the module docstring).
    profile : bool
        Run the loads under cProfile and add the split of their time (``profile`` key).

    Returns
    -------
    dict
        ``chunk_id, year, seconds, seconds_by_modality, items_by_modality, output_bytes,
        read_bytes, tracemalloc_peak_bytes, peak_rss_bytes`` (and ``profile``).
    """
    import cProfile

    import psutil

    from rtsmap.pipeline.aoi import read_aoi
    from rtsmap.pipeline.grid import GridSpec, chunk_by_id
    from rtsmap.pipeline.load import load_chunk

    profiles = _demo_profiles()
    items = _with_extra_items(_items_by_modality(region, profiles, year), extra_items)
    aoi = read_aoi(region / "aoi.geojson")
    chunk = chunk_by_id(chunk_id, GridSpec(tiles_per_chunk=tiles_per_chunk), aoi.geometry)
    proc = psutil.Process()
    profiler = cProfile.Profile() if profile else None
    read_before = proc.io_counters().read_chars
    seconds: dict[str, float] = {}
    output = 0
    tracemalloc.start()
    for modality, modality_items in items.items():
        if profiler:
            profiler.enable()
        start = time.perf_counter()
        stack = load_chunk(chunk, {modality: modality_items}, profiles, year)
        seconds[modality] = time.perf_counter() - start
        if profiler:
            profiler.disable()
        output += sum(a.nbytes for a in stack.data.values()) + sum(v.nbytes for v in stack.valid.values())
        del stack
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    read_bytes = proc.io_counters().read_chars - read_before
    result = {
        "chunk_id": chunk_id,
        "year": year,
        "seconds": sum(seconds.values()),
        "seconds_by_modality": seconds,
        "items_by_modality": {m: len(v) for m, v in items.items()},
        "output_bytes": output,
        "read_bytes": read_bytes,
        "tracemalloc_peak_bytes": peak,
        "peak_rss_bytes": _peak_rss_bytes(),
    }
    if profiler:
        result["profile"] = _profile_buckets(profiler)
    return result


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


def _measure_in_subprocess(region: Path, chunk_id: str, year: int, tiles_per_chunk: int, extra_items: int,
                           profile: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "benchmarks.bench_load", "--tiles-per-chunk", str(tiles_per_chunk),
           "--extra-items", str(extra_items), *(["--profile"] if profile else []),
           "--measure-one", str(region), chunk_id, str(year)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _years(text: str) -> list[int]:
    """``--years`` as a list; bad input ends the command with one ``error:`` line, status 2."""
    try:
        years = [int(y) for y in text.split(",") if y.strip()]
    except ValueError:
        years = []
    if not years:
        click.echo(f"error: --years: not a comma-separated list of years: {text!r}", err=True)
        sys.exit(2)
    return years


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
@click.option("--years", "years_text", default="2022", show_default=True,
              help="Comma-separated years; each chunk is loaded for each.")
@click.option("--extra-items", default=0, show_default=True,
              help="Copies of each optical item ranked after the real ones (persistent cloud).")
@click.option("--profile", is_flag=True, help="Split the load time by part with cProfile.")
@click.option("--measure-one", nargs=3, default=None, hidden=True)
def bench_load_command(out_dir, regions, base_km, factors, max_chunks, tiles_per_chunk, years_text, extra_items,
                       profile, measure_one):
    """Time and memory of loading chunks, for growing AOIs."""
    if measure_one:
        region, chunk_id, y = measure_one
        click.echo(json.dumps(measure_one_fn(Path(region), chunk_id, int(y), tiles_per_chunk, extra_items, profile)))
        return
    from rtsmap.pipeline.aoi import read_aoi
    from rtsmap.pipeline.grid import GridSpec, plan_grid

    years = _years(years_text)
    if regions:
        todo = [(f"region {i}", Path(r)) for i, r in enumerate(regions)]
    else:
        from rtsmap.workflows.demo_region import generate_region

        root = out_dir or Path(tempfile.mkdtemp(prefix="rtsmap-bench-load-"))
        todo = []
        for f in (float(x) for x in factors.split(",")):
            side_m = base_km * 1000.0 * math.sqrt(f)
            start = time.perf_counter()
            generated = generate_region(root / f"x{f:g}", size_m=(side_m, side_m), years=tuple(years))
            click.echo(f"generated {f:g}x AOI ({side_m / 1000:.2f} km side) in {time.perf_counter() - start:.1f} s")
            todo.append((f"{f:g}x", generated.root))

    rows = []
    click.echo(f"{'AOI':>6} {'chunks':>6} {'chunk':>20} {'year':>4} {'s':>6} {'opt s':>6} {'sar s':>6} "
               f"{'dem s':>6} {'out MB/s':>9} {'read MB':>8} {'peak MB':>8} {'peak RSS MB':>11}")
    for label, region in todo:
        chunks = plan_grid(read_aoi(region / "aoi.geojson").geometry, GridSpec(tiles_per_chunk=tiles_per_chunk))
        for chunk in chunks[: max_chunks or None]:
            for year in years:
                m = _measure_in_subprocess(region, chunk.id, year, tiles_per_chunk, extra_items, profile)
                rows.append((label, m))
                mb = 1e6
                by = m["seconds_by_modality"]
                click.echo(
                    f"{label:>6} {len(chunks):>6} {chunk.id:>20} {year:>4} {m['seconds']:6.2f} "
                    + " ".join(f"{by.get(k, float('nan')):6.2f}" for k in ("optical", "sar", "dem"))
                    + f" {m['output_bytes'] / mb / m['seconds']:9.1f} {m['read_bytes'] / mb:8.1f} "
                    f"{m['tracemalloc_peak_bytes'] / mb:8.1f} {m['peak_rss_bytes'] / mb:11.1f}"
                )
                if "profile" in m:
                    p = m["profile"]
                    click.echo(
                        f"{'':>6} profile: {p['total_s']:.2f} s = odc-stac set-up {p['odc_stac_setup_s']:.2f} s "
                        f"({p['odc_stac_calls']} calls) + odc output fill {p['odc_fill_s']:.2f} s + GDAL reads "
                        f"{p['gdal_read_s']:.2f} s + mosaic {p['mosaic_s']:.2f} s + terrain {p['terrain_s']:.2f} s"
                        f" + other {p['total_s'] - p['odc_stac_setup_s'] - p['odc_fill_s'] - p['gdal_read_s'] - p['mosaic_s'] - p['terrain_s']:.2f} s"
                    )
    seconds = [m["seconds"] for _, m in rows]
    click.echo(f"seconds per chunk-year: mean {sum(seconds) / len(seconds):.2f}, "
               f"min {min(seconds):.2f}, max {max(seconds):.2f} ({len(seconds)} chunk-years)")
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
