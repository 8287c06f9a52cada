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


def api_case(catalog: str, aoi: Path, years: str, folder: Path) -> dict:
    """The same plan against a real STAC API: ``rustac serve`` holding the catalog's items over ``aoi``.

    The served items are those of the local catalog meeting the AOI's bounds in the years (the
    in-memory server holds them all, so keep this to a few boxes); the plan then asks the API
    once per block, modality and year.
    """
    import datetime as dt

    from rtsmap.pipeline.geoparquet import search_geoparquet
    from rtsmap.pipeline.aoi import read_aoi

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from stac_server import rustac_server

    lo, _, hi = years.partition("-")
    start = dt.datetime(int(lo), 1, 1, tzinfo=dt.timezone.utc)
    end = dt.datetime(int(hi or lo), 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc)
    bounds = read_aoi(aoi).geometry_wgs84.bounds
    hrefs, served = [], 0
    for collection in ("cop-dem-glo-30", "sentinel-2-l2a", "sentinel-1-rtc"):
        window = (None, None) if collection == "cop-dem-glo-30" else (start, end)
        items = list(search_geoparquet(catalog, collections=[collection], bbox=bounds, start=window[0], end=window[1]))
        served += len(items)
        meta = folder / f"{collection}.collection.json"
        meta.write_text(json.dumps({
            "type": "Collection", "stac_version": "1.1.0", "id": collection, "description": collection, "license": "other",
            "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]}, "temporal": {"interval": [[None, None]]}},
            "links": []}))
        features = folder / f"{collection}.items.json"
        features.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
        hrefs += [meta, features]
    with rustac_server(hrefs[0::2] + hrefs[1::2]) as url:
        fig = run_case(url, aoi, years, [])
    fig["api_items_served"] = served
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", required=True, help="stac-geoparquet file or folder, NDJSON, or a STAC API URL")
    parser.add_argument("--aoi", type=Path, required=True, help="the band's aoi.geojson (from pan_arctic_catalog)")
    parser.add_argument("--years", nargs="+", default=["2024", "2022-2024", "2017-2024"])
    parser.add_argument("--areas", nargs="+", type=int, default=[1, 4, 16], help="sixteenths of the AOI file")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--api-boxes", type=int, default=0,
                        help="also plan the first N boxes against a rustac serve STAC API of the same items")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `rtsmap plan` flags")
    args = parser.parse_args(argv)
    figures = []
    with tempfile.TemporaryDirectory() as folder:
        for area in sorted(args.areas) if args.areas != [0] else []:
            aoi = args.aoi if area >= 16 else _sub_aoi(args.aoi, area / 16, Path(folder))
            for years in args.years:
                fig = run_case(args.catalog, aoi, years, args.extra)
                fig["area_sixteenths"] = area
                print(json.dumps(fig), flush=True)
                figures.append(fig)
        if args.api_boxes:
            aoi = _sub_aoi(args.aoi, args.api_boxes / len(json.loads(args.aoi.read_text())["features"]), Path(folder))
            for years in args.years:
                fig = api_case(args.catalog, aoi, years, Path(folder))
                fig["api_boxes"] = args.api_boxes
                print(json.dumps(fig), flush=True)
                figures.append(fig)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
