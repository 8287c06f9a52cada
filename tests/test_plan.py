"""``rtsmap plan``: grid, items per modality and year, gaps and estimate, from real files and a real API."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyproj
import pystac
import pytest
import shapely
from click.testing import CliRunner
from shapely.geometry import box, mapping

from rtsmap.pipeline.errors import ConfigError
from rtsmap.workflows.cli import cli, main
from rtsmap.workflows.config import GridConfig, RunConfig
from rtsmap.workflows.plan import plan_report, resolve_profile

try:  # tests/ is a plain folder on sys.path under pytest's default import mode
    from stac_server import rustac_server
except ImportError:  # or a package, if tests/__init__.py appears
    from tests.stac_server import rustac_server

REPO = Path(__file__).resolve().parents[1]
UTC = dt.timezone.utc
AOI_LONLAT = box(-135.36, 67.38, -135.30, 67.41)
WEST_HALF = box(-135.40, 67.37, -135.35, 67.42)  # covers only the AOI's western part
# The demo model's 128 px tiles at 10 m, overlap 8 px: stride 120 px, 2x2 tiles = 2.4 km chunks.
DEMO_ASSETS = {
    "rtsmap-demo-s2-l2a": ("blue", "green", "red", "nir", "scl"),
    "rtsmap-demo-s1-rtc": ("vv", "vh"),
    "rtsmap-demo-dem": ("dem",),
}
GRID_ARGS = ["--overlap-px", "8", "--tiles-per-chunk", "2"]
STRIDE_M = 2 * (128 - 8) * 10.0


def _item(item_id, collection, geom, when, props=None):
    item = pystac.Item(
        id=item_id, geometry=mapping(geom), bbox=list(geom.bounds), datetime=when,
        properties=dict(props or {}), collection=collection,
    )
    # The assets the demo profile reads, so the profile rule recognises the catalog as demo.
    for key in DEMO_ASSETS[collection]:
        item.add_asset(key, pystac.Asset(href=f"/nowhere/{item_id}/{key}.tif"))
    return item


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    """An AOI and items in the demo collections: optical 2022 absent, SAR 2022 covering part."""
    root = tmp_path_factory.mktemp("plan")
    aoi = root / "aoi.geojson"
    aoi.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": mapping(AOI_LONLAT)}]}))
    whole = AOI_LONLAT.buffer(0.05)
    items = [
        _item("s2-2021-clear", "rtsmap-demo-s2-l2a", whole, dt.datetime(2021, 7, 14, tzinfo=UTC), {"eo:cloud_cover": 10.0}),
        _item("s2-2021-cloudy", "rtsmap-demo-s2-l2a", whole, dt.datetime(2021, 8, 3, tzinfo=UTC), {"eo:cloud_cover": 95.0}),
        _item("s2-2022-june", "rtsmap-demo-s2-l2a", whole, dt.datetime(2022, 6, 20, tzinfo=UTC), {"eo:cloud_cover": 1.0}),
        _item("s1-2021", "rtsmap-demo-s1-rtc", whole, dt.datetime(2021, 7, 21, tzinfo=UTC)),
        _item("s1-2022-west", "rtsmap-demo-s1-rtc", WEST_HALF, dt.datetime(2022, 7, 31, tzinfo=UTC)),
        _item("dem", "rtsmap-demo-dem", whole, None,
              {"start_datetime": "2012-01-01T00:00:00Z", "end_datetime": "2017-12-31T00:00:00Z"}),
    ]
    catalog = root / "items.json"
    catalog.write_text(json.dumps({"type": "FeatureCollection", "features": [it.to_dict() for it in items]}))
    collections = []
    for cid in ("rtsmap-demo-s2-l2a", "rtsmap-demo-s1-rtc", "rtsmap-demo-dem"):
        coll = pystac.Collection(id=cid, description=cid, extent=pystac.Extent(
            pystac.SpatialExtent([[-180, -90, 180, 90]]), pystac.TemporalExtent([[None, None]])))
        path = root / f"{cid}.json"
        path.write_text(json.dumps(coll.to_dict(include_self_link=False)))
        collections.append(path)
    return {"aoi": aoi, "catalog": catalog, "collections": collections, "west": WEST_HALF}


def _plan_json(args):
    result = CliRunner().invoke(cli, ["plan", *args, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)  # stdout holds the JSON document and nothing else


def test_plan_json_counts_items_gaps_and_estimate(region):
    plan = _plan_json(["--aoi", str(region["aoi"]), "--years", "2021-2022", "--catalog", str(region["catalog"]),
                       "--profile", "demo", *GRID_ARGS])
    assert plan["profile"] == "demo" and plan["years"] == [2021, 2022]
    assert plan["grid"]["tile_px"] == 128 and plan["model"]["name"] == "demo-residual_attention"
    n_chunks = plan["chunks"]
    assert n_chunks == len(plan["chunk_ids"]) > 3
    assert plan["tiles"] > n_chunks
    assert plan["items"] == {
        "optical": {"2021": 1, "2022": 0},  # the cloudy one and the June one are left out
        "sar": {"2021": 1, "2022": 1},
        "dem": {"static": 1},
    }
    assert plan["missing"]["optical"]["2022"] == plan["chunk_ids"]
    assert plan["missing"]["optical"]["2021"] == [] and plan["missing"]["dem"]["static"] == []
    # SAR 2022 covers only the west: some chunks have no item, others are touched
    gaps = plan["missing"]["sar"]["2022"]
    assert 0 < len(gaps) < n_chunks
    to_grid = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:3413", always_xy=True)
    west = shapely.transform(shapely.segmentize(region["west"], 0.001),
                             lambda xy: np.column_stack(to_grid.transform(xy[:, 0], xy[:, 1])))
    spacing = STRIDE_M  # chunk stride in metres for the grid arguments
    for cid in plan["chunk_ids"]:
        col, row = (int(v) for v in cid.split("_c")[1].split("_r"))
        x0, y1 = col * spacing, -row * spacing
        chunk_box = box(x0, y1 - spacing - 80, x0 + spacing + 80, y1)  # read window: + overlap (8 px)
        assert (cid in gaps) == (not chunk_box.intersects(west)), cid
    # the chunks the western item touches but does not cover are partial
    assert plan["partial"]["sar"]["2022"]
    # estimate: 2 years; bytes per pixel: optical 4 x uint16 + scl uint8 = 9, sar 2 x float32 = 8, dem float32 = 4
    est = plan["estimate"]
    assert est["tile_years"] == plan["tiles"] * 2
    window_px = (2 * 120 + 8) ** 2
    # one task per chunk holds all its years: the DEM is read once per chunk, not once per year
    assert est["input_bytes"] == n_chunks * window_px * ((9 + 8) * 2 + 4)
    assert est["tasks"] == n_chunks and est["chunk_years"] == n_chunks * 2
    assert est["seconds"] == pytest.approx(est["tile_years"] * 0.1)


def test_plan_text_output(region):
    result = CliRunner().invoke(cli, ["plan", "--aoi", str(region["aoi"]), "--years", "2021,2022",
                                      "--catalog", str(region["catalog"]), *GRID_ARGS, "--tile-seconds", "2"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    config = RunConfig(aoi=str(region["aoi"]), years=(2021, 2022), catalog=str(region["catalog"]), profile=None,
                       grid=GridConfig(overlap_px=8, tiles_per_chunk=2))
    plan = plan_report(config)
    assert f"chunks    {plan['chunks']} ({plan['tiles']} tiles)" in out
    assert "profile demo" in out  # inferred from the catalog's collections
    assert "optical   2022         0" in out
    assert "chunks with no item" in out and plan["missing"]["sar"]["2022"][0] in out
    assert "assumed 2 s per tile" in out


def test_plan_from_api_equals_plan_from_file(region):
    local = _plan_json(["--aoi", str(region["aoi"]), "--years", "2021-2022", "--catalog", str(region["catalog"]),
                        "--profile", "demo", *GRID_ARGS])
    with rustac_server([*region["collections"], region["catalog"]]) as url:
        api = _plan_json(["--aoi", str(region["aoi"]), "--years", "2021-2022", "--catalog", url,
                          "--profile", "demo", *GRID_ARGS])
    assert api.pop("catalog").startswith("http://127.0.0.1")
    local.pop("catalog")
    assert api == local


@pytest.mark.parametrize("years", ["20x1", "2023-2021", "", "2021-", "1700"])
def test_plan_refuses_bad_years(region, years):
    result = CliRunner().invoke(cli, ["plan", "--aoi", str(region["aoi"]), "--years", years,
                                      "--catalog", str(region["catalog"])])
    assert isinstance(result.exception, ConfigError), result.output
    assert "years" in str(result.exception)


def test_profile_resolution_errors(tmp_path):
    aoi = tmp_path / "aoi.geojson"  # the AOI is read first (before the catalog), so it must exist
    aoi.write_text('{"type": "Polygon", "coordinates": [[[-135.3, 67.4], [-135.2, 67.4], [-135.2, 67.5], [-135.3, 67.4]]]}')
    assert resolve_profile("demo").name == "demo"
    assert resolve_profile(REPO / "workflows" / "profiles" / "earth-search.yaml").url.startswith("https://earth-search")
    with pytest.raises(ConfigError, match="neither a shipped profile"):
        resolve_profile("no-such-profile")
    with pytest.raises(ConfigError, match="give --profile"):
        plan_report(RunConfig(aoi=str(aoi), years=(2021,), catalog="https://stac.example.org/v1", profile=None))


def test_cli_missing_aoi_is_one_line_exit_2(region, tmp_path):
    missing = tmp_path / "missing.geojson"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(REPO / ".venv" / "bin" / "rtsmap"), "plan", "--aoi", str(missing), "--years", "2021",
         "--catalog", str(region["catalog"])],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]


def test_plan_on_generated_demo_region(tmp_path):
    demo_region = pytest.importorskip("rtsmap.workflows.demo_region")
    region = demo_region.generate_region(tmp_path / "demo", years=(2021, 2022), size_m=(1500.0, 1500.0))
    plan = _plan_json(["--aoi", str(region.aoi), "--years", "2021-2022", "--catalog", str(region.catalog), *GRID_ARGS])
    assert plan["profile"] == "demo"
    assert plan["chunks"] >= 1
    for modality, per_year in plan["items"].items():
        for year, count in per_year.items():
            assert count >= 1, (modality, year)
            assert plan["missing"][modality][year] == [], (modality, year)
    # the NDJSON and the ItemCollection give the same plan as the static catalog
    for other in (region.items, region.items_ndjson):
        again = _plan_json(["--aoi", str(region.aoi), "--years", "2021-2022", "--catalog", str(other), *GRID_ARGS])
        assert {k: v for k, v in again.items() if k != "catalog"} == {k: v for k, v in plan.items() if k != "catalog"}


def test_plan_lists_are_bounded_and_chunks_file_holds_every_chunk(region, tmp_path, capsys):
    """A pan-Arctic report keeps counts and at most --list-limit ids per list; the NDJSON file has them all."""
    args = ["--aoi", str(region["aoi"]), "--years", "2021-2022", "--catalog", str(region["catalog"]),
            "--profile", "demo", *GRID_ARGS]
    full = _plan_json(args)
    assert full["truncated"] is False and full["list_limit"] == 10_000 and full["chunks_file"] is None
    chunks_file = tmp_path / "chunks.ndjson"
    cut = _plan_json([*args, "--list-limit", "2", "--chunks-file", str(chunks_file)])
    assert cut["truncated"] is True and cut["chunks"] == full["chunks"] > 2
    assert cut["chunk_ids"] == full["chunk_ids"][:2]  # the first ids in sorted order
    assert cut["missing"]["optical"]["2022"] == full["missing"]["optical"]["2022"][:2]
    for kind in ("missing", "partial"):
        for modality, per_year in full[kind].items():
            for year, ids in per_year.items():
                assert cut[f"{kind}_counts"][modality][year] == len(ids) == full[f"{kind}_counts"][modality][year]
    lines = [json.loads(line) for line in chunks_file.read_text().splitlines()]
    assert sorted(line["chunk_id"] for line in lines) == full["chunk_ids"]
    assert sum(line["tiles"] for line in lines) == full["tiles"]
    for kind in ("missing", "partial"):
        for modality, per_year in full[kind].items():
            for year, ids in per_year.items():
                assert sorted(c["chunk_id"] for c in lines if f"{modality}:{year}" in c[kind]) == ids
    # The file is not replaced without --overwrite: one error line, exit 2, before any planning.
    before = chunks_file.read_text()
    with pytest.raises(SystemExit) as stop:
        main(["plan", *args, "--chunks-file", str(chunks_file)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "--overwrite" in err[0]
    assert chunks_file.read_text() == before
    assert _plan_json([*args, "--chunks-file", str(chunks_file), "--overwrite"])["chunks"] == full["chunks"]
