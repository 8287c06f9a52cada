"""`rtsmap demo`: the whole pipeline on the synthetic demo region with the demo model.

Generates the region when it is absent, runs it through a LocalCluster, and reports the
inventory and its precision/recall/F1 against the region's true polygons.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from rtsmap.pipeline.errors import ModelError
from rtsmap.workflows.config import DEMO_MODEL, ClusterConfig, GridConfig, RunConfig, parse_years


def ensure_region(region_dir: Path, *, seed: int, years: tuple[int, ...], size_km: float) -> dict:
    """Generate the demo region into ``region_dir`` unless it is already there; return region.json."""
    from rtsmap.workflows.demo_region import generate_region

    meta = region_dir / "region.json"
    if not meta.is_file():
        print(f"[rtsmap] generating the synthetic demo region in {region_dir} ...", file=sys.stderr, flush=True)
        generate_region(region_dir, seed=seed, years=years, size_m=(size_km * 1000.0, size_km * 1000.0))
    return json.loads(meta.read_text())


@click.command("demo")
@click.option("--out", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the region, the work directory and the inventory.")
@click.option("--model", type=click.Path(dir_okay=False), default=str(DEMO_MODEL), show_default=True,
              help="Exported ONNX model.")
@click.option("--workers", type=int, default=2, show_default=True, help="Local Dask worker processes.")
@click.option("--years", default="2021-2023", show_default=True, help="Years of the generated region.")
@click.option("--size-km", type=float, default=6.0, show_default=True, help="Side of the generated region.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated region.")
def demo_command(out_dir, model, workers, years, size_km, seed):
    """Run rtsmap end to end on the synthetic demo region (generated if absent).

    The demo model was trained on synthetic scenes only: it shows that the pipeline works, it is
    not a scientific model.
    """
    from rtsmap.workflows.run import EXIT_PARTIAL, print_summary, run

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(model).is_file():
        raise ModelError(f"model {model} not found; train and export one with `rtsmap train` (see README)")
    region = ensure_region(out / "region", seed=seed, years=parse_years(years), size_km=size_km)
    region_dir = out / "region"
    config = RunConfig(
        aoi=str(region_dir / "aoi.geojson"),
        years=tuple(region["years"]),
        catalog=str(region_dir / "stac" / "items.json"),
        profile="demo",
        model=str(model),
        out=str(out / "demo_inventory.gpkg"),
        overwrite=True,
        truth=str(region_dir / "truth.gpkg"),
        # Small chunks so that the small demo region still makes several tasks per year.
        grid=GridConfig(tiles_per_chunk=2),
        cluster=ClusterConfig(kind="local", n_workers=workers),
    )
    result = run(config)
    print_summary(result)
    if result.partial:
        sys.exit(EXIT_PARTIAL)
