"""GeoPackage inventory (pipeline/inventory.py) and its evaluation (pipeline/evaluation.py, CLI)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import uuid

import geopandas as gpd
import pyogrio
import pytest
import shapely
from click.testing import CliRunner

from rtsmap.pipeline.errors import OutputError, RtsmapError
from rtsmap.pipeline.evaluation import evaluate_inventory, match_polygons, read_truth
from rtsmap.pipeline.inventory import (
    RTS_FIELDS, check_geopackage, read_coverage, read_inventory, read_run_metadata, rts_uid, write_inventory,
)

CRS = "EPSG:3413"
X0, Y0 = -2_300_000.0, 200_000.0  # Peel Plateau-ish, EPSG:3413


def slumps(n, year, dx=0.0):
    geoms = [shapely.box(X0 + 500 * k + dx, Y0, X0 + 500 * k + 200 + dx, Y0 + 150) for k in range(n)]
    return gpd.GeoDataFrame({
        "rts_id": [f"3413_{year}_x{k}" for k in range(n)], "year": [year] * n, "score": [0.9] * n,
        "n_detections": [2] * n, "tile_ids": ["t1,t2"] * n, "source_items": ["S2A_1,DEM_1"] * n,
    }, geometry=geoms, crs=CRS)


def coverage(year):
    return gpd.GeoDataFrame({"status": ["processed", "no_data", "failed"],
                             "reason": ["", "no optical scene", "AssetError: truncated COG"]},
                            geometry=[shapely.box(X0, Y0 - 1000, X0 + 3000, Y0 + 1000),
                                      shapely.box(X0 + 3000, Y0 - 1000, X0 + 4000, Y0 + 1000),
                                      shapely.box(X0 + 4000, Y0 - 1000, X0 + 5000, Y0 + 1000)], crs=CRS)


META = {"config": {"grid": {"resolution": 10}}, "model": {"name": "demo", "version": "1", "weights_sha256": "ab" * 32},
        "software_version": "0.1.0", "stac_items": {"2021": ["S2A_1", "DEM_1"]}, "started": "2024-01-01T00:00:00Z",
        "finished": "2024-01-02T00:00:00Z", "base_map_dates": {"2021": "2021-07-01,2021-08-31"}}


@pytest.fixture
def inventory(tmp_path):
    path = tmp_path / "inv.gpkg"
    write_inventory(path, {2021: slumps(3, 2021), 2022: slumps(0, 2022)}, {2021: coverage(2021), 2022: coverage(2022)}, META)
    return path


def test_layers_fields_and_arts_schema(inventory, arts_schema_path):
    layers = dict(pyogrio.list_layers(inventory))
    assert set(layers) == {"rts_2021", "rts_2022", "coverage_2021", "coverage_2022", "rts_tracks", "run_metadata"}
    assert layers["rts_2021"] == "MultiPolygon" and layers["run_metadata"] is None and layers["rts_tracks"] is None
    inv = read_inventory(inventory)
    assert sorted(inv) == [2021, 2022]
    assert len(inv[2021]) == 3 and len(inv[2022]) == 0  # processed year, no slumps: layer exists
    assert list(inv[2022].columns) == list(RTS_FIELDS) + ["geometry"]
    row = inv[2021].iloc[0]
    # Every ARTS field the schema marks Required=True or Generated is there.
    import csv
    with open(arts_schema_path, encoding="utf-8") as f:
        arts = [r["FieldName"] for r in csv.DictReader(f) if r["Required"] in ("True", "Generated")]
    assert set(arts) <= set(inv[2021].columns)
    assert row.TrainClass == "Positive" and row.LabelType == "Polygon"
    assert row.BaseMapDate == "2021-07-01,2021-08-31" and row.ContributionDate == "2024-01-02"
    assert str(uuid.UUID(row.UID)) == row.UID == rts_uid(row.rts_id)
    assert 60 < row.CentroidLat < 90 and round(row.CentroidLat, 5) == row.CentroidLat
    assert row.area_m2 == pytest.approx(200 * 150) and row.Area == pytest.approx(row.area_m2)
    assert inv[2021].crs.to_epsg() == 3413


def test_coverage_and_run_metadata(inventory):
    cov = read_coverage(inventory)
    assert list(cov[2021]["status"]) == ["processed", "no_data", "failed"]
    assert cov[2021]["reason"].iloc[2].startswith("AssetError")
    meta = read_run_metadata(inventory)
    assert meta["model"]["weights_sha256"] == "ab" * 32 and meta["stac_items"]["2021"] == ["S2A_1", "DEM_1"]


def test_geopackage_core_tables_valid(inventory):
    assert check_geopackage(inventory) == []
    with sqlite3.connect(inventory) as con:
        kinds = dict(con.execute("SELECT table_name, data_type FROM gpkg_contents"))
    assert kinds["run_metadata"] == "attributes" and kinds["rts_2022"] == "features"
    if shutil.which("ogrinfo"):  # GDAL's own reader, when installed
        out = subprocess.run(["ogrinfo", "-so", "-al", str(inventory)], capture_output=True, text=True)
        assert out.returncode == 0 and "rts_2021" in out.stdout


def test_existing_file_needs_overwrite_and_stays_intact(inventory):
    before = inventory.read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        write_inventory(inventory, {2021: slumps(1, 2021)}, {2021: coverage(2021)}, META)
    assert inventory.read_bytes() == before
    # A failing write (bad coverage status) leaves the old file and no temporary behind.
    bad = coverage(2021).assign(status="maybe")
    with pytest.raises(OutputError, match="unknown status"):
        write_inventory(inventory, {2021: slumps(1, 2021)}, {2021: bad}, META, overwrite=True)
    assert inventory.read_bytes() == before
    assert [p.name for p in inventory.parent.iterdir()] == [inventory.name]
    write_inventory(inventory, {2021: slumps(1, 2021)}, {2021: coverage(2021)}, META, overwrite=True)
    assert len(read_inventory(inventory)[2021]) == 1


def test_unwritable_or_missing_directory(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        write_inventory(tmp_path / "nope" / "inv.gpkg", {}, {2021: coverage(2021)}, META)
    with pytest.raises(OutputError, match="does not exist"):
        read_inventory(tmp_path / "missing.gpkg")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(OutputError, match="not writable"):
            write_inventory(locked / "inv.gpkg", {}, {2021: coverage(2021)}, META)
    finally:
        os.chmod(locked, 0o700)


def test_match_polygons_one_to_one():
    truth = [shapely.box(0, 0, 100, 100), shapely.box(200, 0, 300, 100), shapely.box(400, 0, 500, 100)]
    pred = [shapely.box(5, 0, 100, 100), shapely.box(0, 0, 100, 95),  # two claims on one truth
            shapely.box(200, 0, 240, 100), shapely.box(1000, 0, 1100, 100)]
    m = match_polygons(pred, truth, iou_threshold=0.5)
    assert (m.tp, m.fp, m.fn) == (1, 3, 2)
    assert m.precision == pytest.approx(0.25) and m.recall == pytest.approx(1 / 3)
    assert m.f1 == pytest.approx(2 * 0.25 * (1 / 3) / (0.25 + 1 / 3))


def test_default_iou_threshold_is_one_half():
    """A pair overlapping at IoU 0.25 (between 0.1 and 0.5) is no match by default; at 0.54 it is."""
    truth = [shapely.box(0, 0, 100, 100)]
    weak = [shapely.box(60, 0, 160, 100)]  # 4,000 / 16,000 = 0.25
    strong = [shapely.box(30, 0, 130, 100)]  # 7,000 / 13,000 = 0.54
    assert match_polygons(weak, truth, iou_threshold=0.2).tp == 1  # a real candidate pair
    m = match_polygons(weak, truth)
    assert (m.tp, m.fp, m.fn) == (0, 1, 1)
    assert match_polygons(strong, truth).tp == 1


def test_evaluate_inventory_default_iou_threshold(tmp_path, inventory):
    # The inventory's slumps against truth shifted 110 m: IoU 13,500 / 46,500 = 0.29 each.
    truth = tmp_path / "truth.gpkg"
    pyogrio.write_dataframe(slumps(3, 2021, dx=110.0)[["geometry"]], truth, layer="rts_2021")
    assert evaluate_inventory(inventory, truth, iou_threshold=0.25)[2021].tp == 3
    res = evaluate_inventory(inventory, truth)[2021]
    assert (res.tp, res.fp, res.fn) == (0, 3, 3)


def test_evaluate_inventory_against_gpkg_and_arts_truth(tmp_path, inventory):
    # Truth as an inventory-like GPKG: the same slumps, shifted 20 m (IoU 180/220 = 0.82).
    truth = tmp_path / "truth.gpkg"
    pyogrio.write_dataframe(slumps(3, 2021, dx=20.0)[["geometry"]], truth, layer="rts_2021")
    res = evaluate_inventory(inventory, truth, iou_threshold=0.5)
    assert res[2021].tp == 3 and res[2021].f1 == pytest.approx(1.0)
    assert evaluate_inventory(inventory, truth, iou_threshold=0.9)[2021].tp == 0
    # Truth in the ARTS schema (one file, year from BaseMapDate), in WGS84: reprojected.
    arts = slumps(2, 2021).to_crs("EPSG:4326")[["geometry"]].assign(BaseMapDate="2021-07-03,2021-08-01")
    arts_path = tmp_path / "arts.geojson"
    arts.to_file(arts_path, driver="GeoJSON")
    assert sorted(read_truth(arts_path)) == [2021]
    res = evaluate_inventory(inventory, arts_path, iou_threshold=0.5)
    assert (res[2021].tp, res[2021].fp, res[2021].fn) == (2, 1, 0)


def test_evaluate_inventory_cli(tmp_path, inventory):
    from rtsmap.workflows.inventory_commands import evaluate_inventory_command
    truth = tmp_path / "truth.gpkg"
    pyogrio.write_dataframe(slumps(3, 2021)[["geometry"]], truth, layer="rts_2021")
    out = CliRunner().invoke(evaluate_inventory_command, ["--inventory", str(inventory), "--truth", str(truth), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["years"]["2021"]["f1"] == 1.0 and data["iou_threshold"] == 0.5
    table = CliRunner().invoke(evaluate_inventory_command, ["--inventory", str(inventory), "--truth", str(truth)])
    assert "2021" in table.output and "precision" in table.output
    with pytest.raises(RtsmapError, match="does not exist"):
        evaluate_inventory(inventory, tmp_path / "missing.gpkg")
