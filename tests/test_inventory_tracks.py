"""Tracks in the inventory: change fields and rts_tracks written and read back (pyogrio, GDAL's
ogrinfo and validate_gpkg.py), the change evaluation through `rtsmap evaluate-inventory`, the
change quick-looks and the run summary's change line.

The inventory is built from the synthetic demo region's truth (tests/conftest.py), one slump
left out in 2022 (a miss: the slump is "no longer seen" in 2022, its track ends, and it comes
back "new" in 2023), linked with pipeline.tracks.link_years.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import shapely
from click.testing import CliRunner

from rtsmap.pipeline.errors import OutputError
from rtsmap.pipeline.evaluation import read_truth
from rtsmap.pipeline.inventory import (
    RELATION_FIELDS, RTS_FIELDS, change_classes, change_summary, check_geopackage, format_change,
    no_longer_seen, read_inventory, read_tracks, write_inventory,
)
from rtsmap.pipeline.tracks import link_years
from rtsmap.workflows.inventory_commands import evaluate_inventory_command
from rtsmap.workflows.quicklook import change_quicklook_paths, check_quicklooks, write_change_quicklooks

CRS = "EPSG:3413"
MISSED_YEAR = 2022


def demo_layers(truth):
    """The truth as an inventory would hold it (rts_id, score), the first slump of 2022 missed."""
    layers = {}
    for year, t in truth.items():
        t = t.reset_index(drop=True)
        if year == MISSED_YEAR:
            t = t.iloc[1:]
        layers[year] = gpd.GeoDataFrame({"rts_id": [f"{year}_{s}" for s in t["slump_id"]], "score": 0.9},
                                        geometry=list(t.geometry), crs=t.crs)
    return layers


def full_coverage(layers):
    ground = shapely.box(*np.array([f.total_bounds for f in layers.values()]).T[[0, 1]].min(axis=1),
                         *np.array([f.total_bounds for f in layers.values()]).T[[2, 3]].max(axis=1)).buffer(200)
    return {y: gpd.GeoDataFrame({"status": ["processed"], "reason": [""]}, geometry=[ground], crs=CRS) for y in layers}


@pytest.fixture(scope="module")
def demo(demo_region, tmp_path_factory):
    """(truth path, linked layers, tracks table, coverage, inventory path)."""
    truth = read_truth(demo_region.truth)
    layers = demo_layers(truth)
    coverage = full_coverage(layers)
    linked, tracks = link_years(layers, coverage)
    path = tmp_path_factory.mktemp("inv") / "demo.gpkg"
    write_inventory(path, linked, coverage, {"software_version": "test"}, tracks=tracks)
    return demo_region.truth, linked, tracks, coverage, path


def test_change_fields_and_tracks_table_read_back(demo):
    _, linked, tracks, _, path = demo
    inv = read_inventory(path)
    assert sorted(inv) == sorted(linked)
    for year, frame in inv.items():
        assert list(frame.columns) == list(RTS_FIELDS) + ["geometry"]
        want = linked[year].sort_values("rts_id").reset_index(drop=True)
        assert frame["UID"].tolist() == want["UID"].tolist()
        assert frame["track_id"].tolist() == want["track_id"].tolist()
        assert frame["change"].tolist() == want["change"].tolist()
        np.testing.assert_allclose(frame["area_change_m2"].to_numpy(float), want["area_change_m2"].to_numpy(float))
        # link_years' -1 ("no predecessor") is NULL in the file.
        assert frame["prev_year"].isna().tolist() == (want["prev_year"] < 0).tolist()
        for field in RELATION_FIELDS:
            assert frame[field].fillna("").tolist() == want[field].tolist()
    assert set(inv[2021]["change"]) == {"first_seen"} and inv[2021]["prev_year"].isna().all()
    assert {"new", "grown", "stable"} <= set(inv[2022]["change"]) | set(inv[2023]["change"])
    assert (inv[2022]["StabilizedRTS"] != "").any()  # relation fields come from the frame
    table = read_tracks(path)
    assert table["track_id"].tolist() == tracks["track_id"].tolist()
    assert table["status"].tolist() == tracks["status"].tolist()
    np.testing.assert_allclose(table["area_m2_2023"].to_numpy(float), tracks["area_m2_2023"].to_numpy(float))
    assert set(pd.concat([f["track_id"] for f in inv.values()])) <= set(table["track_id"])
    assert "not_seen" in set(table["status"])  # the missed slump's first track


def test_every_layer_valid_for_gdal(demo, validate_gpkg):
    path = demo[4]
    assert check_geopackage(path) == []
    with sqlite3.connect(path) as con:
        kinds = dict(con.execute("SELECT table_name, data_type FROM gpkg_contents"))
    assert kinds["rts_tracks"] == "attributes" and kinds["run_metadata"] == "attributes"
    assert kinds["rts_2022"] == "features"
    ogrinfo = shutil.which("ogrinfo")
    if ogrinfo is None:
        pytest.skip("ogrinfo (apt package gdal-bin, installed by .ci/run) is not installed")
    proc = subprocess.run([ogrinfo, "-ro", "-al", "-so", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stdout + proc.stderr and "ERROR" not in proc.stderr
    for layer in kinds:
        assert f"Layer name: {layer}" in proc.stdout
    assert "track_id: String" in proc.stdout and "area_change_m2: Real" in proc.stdout
    assert "growth_m2_per_yr: Real" in proc.stdout
    validate_gpkg(path)


def test_old_callers_get_tracks_linked_in_the_write(demo, tmp_path):
    truth_path, linked, tracks, coverage, _ = demo
    layers = demo_layers(read_truth(truth_path))  # merge output: no change fields
    path = write_inventory(tmp_path / "old.gpkg", layers, coverage, {"software_version": "test"})
    inv = read_inventory(path)
    for year, frame in inv.items():
        want = linked[year].sort_values("rts_id").reset_index(drop=True)
        assert frame["track_id"].tolist() == want["track_id"].tolist()
        assert frame["change"].tolist() == want["change"].tolist()
    assert read_tracks(path)["track_id"].tolist() == tracks["track_id"].tolist()


def test_tracks_that_do_not_belong_to_the_layers_are_refused(demo, tmp_path):
    truth_path, linked, tracks, coverage, _ = demo
    meta = {"software_version": "test"}
    with pytest.raises(OutputError, match="not in the tracks table"):
        write_inventory(tmp_path / "a.gpkg", linked, coverage, meta, tracks=tracks.iloc[1:])
    with pytest.raises(OutputError, match="slumps without track_id"):
        write_inventory(tmp_path / "b.gpkg", demo_layers(read_truth(truth_path)), coverage, meta, tracks=tracks)
    bad = {y: f.assign(change="vanished") for y, f in linked.items()}
    with pytest.raises(OutputError, match="unknown change value"):
        write_inventory(tmp_path / "c.gpkg", bad, coverage, meta, tracks=tracks)
    assert not list(tmp_path.iterdir())  # nothing written


def test_change_summary_and_line(demo):
    _, linked, _, coverage, _ = demo
    summary = change_summary(linked, coverage)
    assert sorted(summary) == [2022, 2023]
    for year, row in summary.items():
        counts = linked[year]["change"].value_counts()
        assert row["slumps"] == len(linked[year])
        assert row["new"] == counts.get("new", 0) and row["grown"] == counts.get("grown", 0)
        assert row["stable"] == counts.get("stable", 0)
        assert row["area_change_m2"] == pytest.approx(np.nansum(linked[year]["area_change_m2"]))
    assert summary[2022]["no_longer_seen"] == 1 and summary[2023]["no_longer_seen"] == 0
    assert summary[2023]["new"] >= 1  # the missed slump comes back
    line = format_change(2022, summary[2022])
    assert line.startswith(f"2022 change: {summary[2022]['new']} new, {summary[2022]['grown']} grown")
    assert "1 no longer seen" in line and "ha" in line


def test_no_data_is_not_no_longer_seen():
    a = shapely.box(0, 0, 100, 100)
    layers = {2021: gpd.GeoDataFrame({"rts_id": ["a"]}, geometry=[a], crs=CRS),
              2022: gpd.GeoDataFrame({"rts_id": []}, geometry=[], crs=CRS)}
    processed = gpd.GeoDataFrame({"status": ["processed"]}, geometry=[shapely.box(-500, -500, 500, 500)], crs=CRS)
    no_data = gpd.GeoDataFrame({"status": ["no_data"]}, geometry=[shapely.box(-500, -500, 500, 500)], crs=CRS)
    linked, _ = link_years(layers, {2021: processed, 2022: processed})
    assert no_longer_seen(linked[2021], linked[2022], processed).tolist() == [True]
    assert no_longer_seen(linked[2021], linked[2022], no_data).tolist() == [False]
    # Merged into a neighbour is not gone; a merged slump that grew counts as grown.
    b = shapely.box(110, 0, 200, 100)
    merged, _ = link_years({2021: gpd.GeoDataFrame({"rts_id": ["a", "b"]}, geometry=[a, b], crs=CRS),
                            2022: gpd.GeoDataFrame({"rts_id": ["ab"]}, geometry=[shapely.box(0, 0, 200, 140)], crs=CRS)})
    assert merged[2022]["change"].tolist() == ["merged"]
    assert no_longer_seen(merged[2021], merged[2022]).tolist() == [False, False]
    assert change_classes(merged[2022]).tolist() == ["grown"]


def test_evaluate_inventory_cli_reports_change(demo, tmp_path):
    truth_path, _, _, _, path = demo
    runner = CliRunner()
    out = runner.invoke(evaluate_inventory_command, ["--inventory", str(path), "--truth", str(truth_path), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    change = data["change"]
    assert data["truth_id"] == "slump_id" and change["years"] == [2021, 2022, 2023]
    # The one miss: that slump is not tracked whole, it comes back in 2023 under another track
    # (one identity switch between its matched years) and as a "new" false positive.
    multi = change["true_slumps_multi_year"]
    assert multi >= 5 and change["tracked_whole"] == pytest.approx((multi - 1) / multi)
    assert change["id_switches"] == 1 and change["new"]["fp"] == 1 and change["new"]["recall"] == 1.0
    assert change["area_change"]["mean_abs_error_m2"] == pytest.approx(0.0, abs=1e-6)
    assert data["years"]["2022"]["fn"] == 1 and data["years"]["2021"]["f1"] == 1.0
    table = runner.invoke(evaluate_inventory_command, ["--inventory", str(path), "--truth", str(truth_path)])
    assert table.exit_code == 0, table.output
    text = table.output
    assert "tracked whole" in text and "identity switches" in text and "area change error" in text
    assert f"{change['tracked_whole']:.3f}" in text and f"F1 {change['new']['f1']:.3f}" in text
    # A truth without identities: the per-year table only, and the reason.
    plain = tmp_path / "plain.gpkg"
    for year, t in read_truth(truth_path).items():
        pyogrio.write_dataframe(t[["geometry"]], plain, layer=f"rts_{year}")
    out = runner.invoke(evaluate_inventory_command, ["--inventory", str(path), "--truth", str(plain), "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["change"] is None
    out = runner.invoke(evaluate_inventory_command, ["--inventory", str(path), "--truth", str(plain)])
    assert "change: not scored" in out.output


def test_change_quicklooks(demo, tmp_path):
    _, linked, _, coverage, _ = demo
    out = tmp_path / "run.gpkg"
    assert [p.name for p in change_quicklook_paths(out, linked)] == ["run_change_2021-2022.png", "run_change_2022-2023.png"]
    own = tmp_path / "run_change_2022-2023.png"
    own.write_bytes(b"mine")
    with pytest.raises(OutputError, match="run_change_2022-2023.png already exists"):
        check_quicklooks(out, linked, overwrite=False)  # the run's pre-work check covers them
    with pytest.raises(OutputError, match="already exists"):
        write_change_quicklooks(out, linked, coverage)
    assert own.read_bytes() == b"mine" and not (tmp_path / "run_change_2021-2022.png").exists()
    paths = write_change_quicklooks(out, linked, coverage, overwrite=True)
    assert [p.name for p in paths] == ["run_change_2021-2022.png", "run_change_2022-2023.png"]
    from PIL import Image

    image = np.asarray(Image.open(paths[0]).convert("RGB")).astype(int)
    # Each class present in 2021 -> 2022 is drawn in its colour (new vermillion, grown yellow, unchanged blue).
    classes = set(change_classes(linked[2022]))
    for name, rgb in (("new", (0xD5, 0x5E, 0x00)), ("grown", (0xF0, 0xE4, 0x42)), ("unchanged", (0x00, 0x72, 0xB2))):
        drawn = (np.abs(image - rgb).sum(axis=2) < 12).sum()
        assert (drawn > 20) == (name in classes), name
    with pytest.raises(OutputError, match="not linked"):
        write_change_quicklooks(tmp_path / "x.gpkg", {2021: gpd.GeoDataFrame({"rts_id": ["a"]}, geometry=[shapely.box(0, 0, 1, 1)], crs=CRS),
                                                      2022: gpd.GeoDataFrame({"rts_id": []}, geometry=[], crs=CRS)}, {})
    assert write_change_quicklooks(tmp_path / "one.gpkg", {2021: linked[2021]}, coverage) == []


def _layers_of(path):
    from rtsmap.pipeline.inventory import read_coverage, read_run_metadata

    return read_inventory(path), read_coverage(path), read_tracks(path), read_run_metadata(path)


def test_writer_a_year_at_a_time_in_slices_equals_one_whole_write(demo, demo_region, tmp_path, validate_gpkg):
    """InventoryWriter: years linked one at a time (YearLinker) and appended 2 rows a write give
    the same layers, tracks and metadata as link_years over all years written whole; the file is
    valid and every rts_ layer's spatial index holds every feature."""
    from rtsmap.pipeline.inventory import InventoryWriter

    _, linked, _, coverage, whole = demo
    layers = demo_layers(read_truth(demo_region.truth))
    path = tmp_path / "streamed.gpkg"
    returned = {}
    with InventoryWriter(path, {"software_version": "test"}, crs=CRS, rows_per_write=2) as writer:
        for year in sorted(layers):
            returned[year] = writer.add_year(year, layers[year], coverage[year])
        assert path.exists() is False  # nothing in place before close
        writer.close()
    assert not list(tmp_path.glob(".streamed.gpkg.*"))  # the temporary file is gone
    validate_gpkg(path)
    got, want = _layers_of(path), _layers_of(whole)
    assert sorted(got[0]) == sorted(want[0]) == sorted(layers)
    for year in layers:
        assert len(got[0][year]) == len(layers[year]) > 2  # more rows than one write takes
        pd.testing.assert_frame_equal(got[0][year], want[0][year])
        pd.testing.assert_frame_equal(got[1][year], want[1][year])
        # What add_year returned is what the file holds (finish uses it instead of reading back).
        back = returned[year].reset_index(drop=True)
        assert list(back.columns) == list(got[0][year].columns)
        assert back["track_id"].tolist() == got[0][year]["track_id"].tolist()
        assert back["change"].tolist() == got[0][year]["change"].tolist()
        # The same polygons (the file holds them as MultiPolygons: promoted as they are written).
        assert shapely.equals(np.asarray(back.geometry.values), np.asarray(got[0][year].geometry.values)).all()
    pd.testing.assert_frame_equal(got[2], want[2])
    assert got[3] == want[3]
    with sqlite3.connect(path) as con:
        for year in layers:
            n = con.execute(f"SELECT count(*) FROM rts_{year}").fetchone()[0]
            assert con.execute(f"SELECT count(*) FROM rtree_rts_{year}_geom").fetchone()[0] == n


def test_writer_that_fails_leaves_no_file(demo_region, tmp_path):
    """A schema error in a later year ends the writer: no inventory, no temporary file."""
    from rtsmap.pipeline.inventory import InventoryWriter

    layers = demo_layers(read_truth(demo_region.truth))
    path = tmp_path / "inv.gpkg"
    with pytest.raises(OutputError, match="rts_id"):
        with InventoryWriter(path, {}, crs=CRS, rows_per_write=2) as writer:
            first = min(layers)
            writer.add_year(first, layers[first])
            writer.add_year(first + 1, layers[first + 1].drop(columns="rts_id"))
    assert not path.exists() and not list(tmp_path.iterdir())


def test_written_layer_keeps_text_compact(demo_region, tmp_path):
    """What add_year holds (and returns) for a year costs little per slump: a value every row
    shares is one string object, not a copy per row; per-row text (ids, UIDs, tile lists) is
    pandas' string dtype where that is the default (pandas 3: one buffer, no object per row).
    The layers stay the same on disk (tests above); this pins the memory layout that
    benchmarks/bench_finish.py measures."""
    from rtsmap.pipeline.inventory import InventoryWriter

    layers = demo_layers(read_truth(demo_region.truth))
    first = min(layers)
    with InventoryWriter(tmp_path / "inv.gpkg", {"software_version": "test", "region_name": "demo"}, crs=CRS,
                         rows_per_write=2) as writer:
        back = writer.add_year(first, layers[first], full_coverage(layers)[first])
    assert len(back) > 2
    for field in ("RegionName", "CreatorLab", "BaseMapDate", "BaseMapSource", "TrainClass", "LabelType", "Notes"):
        assert back[field].dtype == object
        assert len({id(v) for v in back[field].to_numpy()}) == 1, field
    text = ("rts_id", "UID", "track_id")  # the demo layers have no tile or item lists
    strings_by_default = pd.api.types.is_string_dtype(pd.Series(["a"]).dtype) and pd.Series(["a"]).dtype != object
    for field in text:
        assert (back[field].dtype != object) == strings_by_default, field
    assert back["UID"].str.len().eq(36).all() and back["UID"].is_unique
