"""`rtsmap demo`: the whole pipeline on the synthetic demo region with the demo model.

Generates the region when it is absent, runs it through a LocalCluster, and reports the
inventory and its precision/recall/F1 against the region's true polygons. With ``--remote`` it
then serves the region over HTTP from nginx on 127.0.0.1, runs the pipeline again reading every
COG through GDAL's range reads from there, and checks that both inventories hold the same
polygons in every year.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import click

from rtsmap.pipeline.errors import ConfigError, ModelError
from rtsmap.workflows.config import DEMO_MODEL, ClusterConfig, GridConfig, RunConfig, parse_years

# Two inventories are the same when their polygons differ by at most this share of their area
# (the same bytes in give the same polygons; this only absorbs float noise).
SAME_AREA_TOLERANCE = 1e-6
EXIT_MISMATCH = 1


def ensure_region(region_dir: Path, *, seed: int, years: tuple[int, ...], size_km: float, sar: str = "realistic") -> dict:
    """Generate the demo region into ``region_dir`` unless it is already there; return region.json.

    Raises
    ------
    ConfigError
        If the region there was made with another SAR synthesis than ``sar``.
    """
    from rtsmap.workflows.demo_region import generate_region

    meta = region_dir / "region.json"
    if not meta.is_file():
        print(f"[rtsmap] generating the synthetic demo region in {region_dir} ...", file=sys.stderr, flush=True)
        generate_region(region_dir, seed=seed, years=years, size_m=(size_km * 1000.0, size_km * 1000.0), sar=sar)
    region = json.loads(meta.read_text())
    if region.get("sar", "legacy") != sar:  # regions made before the SAR variants are legacy
        raise ConfigError(f"the region in {region_dir} has {region.get('sar', 'legacy')} SAR, not {sar}: "
                          "give another --out or the same --sar")
    return region


@click.command("demo")
@click.option("--out", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the region, the work directory and the inventory.")
@click.option("--model", type=click.Path(dir_okay=False), default=str(DEMO_MODEL), show_default=True,
              help="Exported ONNX model.")
@click.option("--workers", type=int, default=2, show_default=True, help="Local Dask worker processes.")
@click.option("--years", default="2021-2023", show_default=True, help="Years of the generated region.")
@click.option("--size-km", type=float, default=6.0, show_default=True, help="Side of the generated region.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated region.")
@click.option("--remote", is_flag=True,
              help="Then serve the region over HTTP (nginx on 127.0.0.1), run again reading every COG "
                   "from there, and check that both inventories hold the same polygons.")
@click.option("--sar", type=click.Choice(("realistic", "legacy")), default="realistic", show_default=True,
              help="SAR synthesis of the generated region (docs/synthetic-sar.md); the shipped demo model was "
                   "trained on realistic, the first demo model on legacy.")
def demo_command(out_dir, model, workers, years, size_km, seed, remote, sar):
    """Run rtsmap end to end on the synthetic demo region (generated if absent).

    The demo model was trained on synthetic scenes only: it shows that the pipeline works, it is
    not a scientific model. Exit status 1 with --remote when the two inventories differ.
    """
    from rtsmap.workflows.http_serve import nginx_executable
    from rtsmap.workflows.run import EXIT_PARTIAL, print_summary, run

    if remote and nginx_executable() is None:
        raise ConfigError("--remote serves the region with nginx, which is not installed; install the nginx package (apt-get install nginx)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(model).is_file():
        raise ModelError(f"model {model} not found; train and export one with `rtsmap train` (see README)")
    region = ensure_region(out / "region", seed=seed, years=parse_years(years), size_km=size_km, sar=sar)
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
    if remote:
        remote_result, traffic = run_over_http(config, region_dir, out / "remote")
        print_summary(remote_result)
        if remote_result.partial:
            sys.exit(EXIT_PARTIAL)
        differences = compare_inventories(Path(result.out), Path(remote_result.out), config.years)
        if differences:
            print(f"error: the inventory read over HTTP differs from the local one: {'; '.join(differences)}", file=sys.stderr)
            sys.exit(EXIT_MISMATCH)
        counts = ", ".join(f"{y.year}: {y.count}" for y in remote_result.years)
        print(f"remote: the inventory read over HTTP ({traffic[0]} requests, {traffic[1] / 1e6:.1f} MB) "
              f"equals the local one (slumps per year: {counts})")


def remote_items(catalog: Path, region_dir: Path, base_url: str, dest: Path) -> Path:
    """Write the region's items with every asset href moved from ``region_dir`` to ``base_url``.

    Parameters
    ----------
    catalog
        The region's item collection (``stac/items.json``).
    region_dir
        The folder the hrefs point into, served at ``base_url``.
    base_url
        ``http://host:port`` serving ``region_dir``.
    dest
        The item collection to write (replaced: it names the server's port, new each time).

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    ConfigError
        If an asset lies outside ``region_dir`` (a region moved after it was generated).
    """
    import pystac

    root = region_dir.resolve()
    items = []
    for item in pystac.ItemCollection.from_file(str(catalog)):
        item = item.clone()
        for key, asset in item.assets.items():
            path = Path(asset.href).resolve()
            if not path.is_relative_to(root):
                raise ConfigError(f"asset {key!r} of item {item.id!r} ({asset.href}) is not in {region_dir}; generate the region again")
            asset.href = f"{base_url}/{path.relative_to(root).as_posix()}"
        items.append(item)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(pystac.ItemCollection(items).to_dict(transform_hrefs=False)))
    return dest


def run_over_http(config: RunConfig, region_dir: Path, work: Path):
    """Run ``config`` again with every COG read over HTTP from nginx serving ``region_dir``.

    Parameters
    ----------
    config
        The local run's configuration.
    region_dir
        The demo region.
    work
        Folder for the served items, nginx's files, the work directory and the inventory
        (``demo_inventory.gpkg``); its work directory is emptied first so that every chunk is
        read over HTTP, not resumed from an earlier run.

    Returns
    -------
    tuple
        The :class:`~rtsmap.workflows.run.RunResult` and ``(requests, body bytes)`` nginx served.
    """
    from rtsmap.workflows.http_serve import serve_folder
    from rtsmap.workflows.run import run

    workdir = work / "demo_inventory.gpkg.work"
    shutil.rmtree(workdir, ignore_errors=True)
    with serve_folder(region_dir, work / "nginx") as served:
        print(f"[rtsmap] --remote: serving {region_dir} at {served.url} (nginx); running again from there",
              file=sys.stderr, flush=True)
        items = remote_items(Path(config.catalog), region_dir, served.url, work / "items.json")
        remote_config = dataclasses.replace(
            config, catalog=str(items), out=str(work / "demo_inventory.gpkg"), workdir=str(workdir),
            truth=None, quicklook=False,
        )
        result = run(remote_config)
        traffic = served.traffic()
    if traffic[0] == 0:
        raise ConfigError(f"nginx at {served.url} served no request: the run did not read over HTTP")
    return result, traffic


def compare_inventories(a: Path, b: Path, years) -> list[str]:
    """How two inventories differ: per year, the slump count and the area their polygons cover.

    Parameters
    ----------
    a, b
        GeoPackages written by ``rtsmap run``.
    years
        The years (layers ``rts_<year>``) to compare.

    Returns
    -------
    list of str
        One line per difference; empty when every year holds the same polygons (same count,
        and the union of each year's polygons differs by at most ``SAME_AREA_TOLERANCE`` of
        its area).
    """
    import geopandas as gpd
    import shapely

    differences = []
    for year in years:
        # Both are written in the run's output CRS (the same configuration).
        ga = gpd.read_file(a, layer=f"rts_{year}").geometry
        gb = gpd.read_file(b, layer=f"rts_{year}").geometry
        if len(ga) != len(gb):
            differences.append(f"{year}: {len(ga)} slumps locally, {len(gb)} over HTTP")
            continue
        if not len(ga):
            continue
        ua, ub = shapely.union_all(ga.values), shapely.union_all(gb.values)
        moved = shapely.symmetric_difference(ua, ub).area
        if moved > SAME_AREA_TOLERANCE * max(ua.area, ub.area):
            differences.append(f"{year}: the polygons differ over {moved / max(ua.area, ub.area):.2%} of their area")
    return differences
