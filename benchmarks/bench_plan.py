"""Wall time and peak memory of `rtsmap plan` over the 60-80 N band, by area and years.

    python -m benchmarks.pan_arctic_catalog --out runs/pa --years 2017-2024
    python -m benchmarks.bench_plan --catalog runs/pa/catalog --aoi runs/pa/aoi.geojson \\
        --years 2024 2022-2024 2017-2024 --areas 1 4 16 --json runs/pa/bench_plan.json

Each case runs `rtsmap plan --json` in a fresh subprocess under ``/usr/bin/time -f %M`` (the
child's maximum resident set, in KB), so the figures are those of the command a user runs. Areas: ``16`` is the whole AOI file (the band's 36 boxes);
``4`` and ``1`` keep the first 9 and the first 2-3 of its boxes (a quarter and a sixteenth of
the area: the boxes are equal in latitude span). A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _sub_aoi(aoi: Path, fraction: float, folder: Path) -> Path:
    data = json.loads(aoi.read_text())
    features = data["features"]
    keep = max(1, round(len(features) * fraction))
    out = folder / f"aoi-{keep}.geojson"
    out.write_text(json.dumps({**data, "features": features[:keep]}))
    return out


def run_case(catalog: str, aoi: Path, years: str, extra: list[str]) -> dict:
    """One `rtsmap plan --json` in a subprocess: seconds, peak RSS (MB), chunks, items."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        started = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss.name, sys.executable, "-m", "rtsmap.workflows.cli", "plan",
             "--aoi", str(aoi), "--years", years, "--catalog", catalog, "--profile", "planetary-computer",
             "--json", *extra],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        seconds = time.perf_counter() - started
        peak_kb = int((rss.read().strip().splitlines() or ["0"])[-1])
    if proc.returncode != 0:
        return {"years": years, "aoi": aoi.name, "error": proc.stderr.strip().splitlines()[-1:]}
    plan = json.loads(proc.stdout)
    return {
        "years": years,
        "aoi": aoi.name,
        "aoi_area_km2": plan["aoi_area_km2"],
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "chunks": plan["chunks"],
        "tiles": plan["tiles"],
        "items": sum(n for per_year in plan["items"].values() for n in per_year.values()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", required=True, help="stac-geoparquet file or folder, NDJSON, or a STAC API URL")
    parser.add_argument("--aoi", type=Path, required=True, help="the band's aoi.geojson (from pan_arctic_catalog)")
    parser.add_argument("--years", nargs="+", default=["2024", "2022-2024", "2017-2024"])
    parser.add_argument("--areas", nargs="+", type=int, default=[1, 4, 16], help="sixteenths of the AOI file")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `rtsmap plan` flags")
    args = parser.parse_args(argv)
    figures = []
    with tempfile.TemporaryDirectory() as folder:
        for area in sorted(args.areas):
            aoi = args.aoi if area >= 16 else _sub_aoi(args.aoi, area / 16, Path(folder))
            for years in args.years:
                fig = run_case(args.catalog, aoi, years, args.extra)
                fig["area_sixteenths"] = area
                print(json.dumps(fig), flush=True)
                figures.append(fig)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
