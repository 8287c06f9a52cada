"""The one planning path: profile rule, plan = run, no silent empty runs, shared signer, offline saved catalogs.

The saved catalogs here are built in the shape of the real services' items (Planetary Computer:
absolute root/self/parent/collection links to its API, ``proj:epsg`` on Sentinel-2 and
``proj:code`` on the others, ``s2:processing_baseline``, Sentinel-1 RTC ``start_datetime``
written with a space); their asset hrefs point at a host that does not exist, so nothing of
them can be read, and nothing must be fetched to plan them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyogrio
import pytest
from shapely.geometry import box, mapping

from onnx_models import ConstantDetection, make_constant_detector, model_metadata
from rtsmap.pipeline.errors import ConfigError, OutputError
from rtsmap.pipeline.stac import open_catalog, shared_signer
from rtsmap.workflows.cli import main
from rtsmap.workflows.config import ClusterConfig, GridConfig, InferenceConfig, RunConfig
from rtsmap.workflows.plan import plan_report
from rtsmap.workflows.planning import infer_profile, plan_chunks

PC = "https://planetarycomputer.microsoft.com/api/stac/v1"
AOI_LONLAT = box(-135.36, 67.38, -135.345, 67.386)  # ~650 m x 670 m: one or two 1.2 km chunks
FOOTPRINT = box(-136.0, 67.0, -134.5, 68.0)
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    # Never wait long on the network: one try, short timeouts.
    "GDAL_HTTP_MAX_RETRY": "0",
    "GDAL_HTTP_TIMEOUT": "5",
    "GDAL_HTTP_CONNECTTIMEOUT": "3",
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
}


def _links(collection: str, item_id: str) -> list[dict]:
    return [
        {"rel": "collection", "href": f"{PC}/collections/{collection}", "type": "application/json"},
        {"rel": "parent", "href": f"{PC}/collections/{collection}", "type": "application/json"},
        {"rel": "root", "href": f"{PC}/", "type": "application/json"},
        {"rel": "self", "href": f"{PC}/collections/{collection}/items/{item_id}", "type": "application/geo+json"},
        {"rel": "preview", "href": f"{PC}/data/item/map?collection={collection}&item={item_id}", "type": "text/html"},
    ]


def _asset(name: str, **extra) -> dict:
    return {
        "href": f"https://nonexistent.invalid/{name}.tif",
        "type": "image/tiff; application=geotiff; profile=cloud-optimized",
        "roles": ["data"],
        **extra,
    }


def _feature(item_id: str, collection: str, properties: dict, assets: dict) -> dict:
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/projection/v1.0.0/schema.json",
            "https://stac-extensions.github.io/eo/v1.0.0/schema.json",
        ],
        "id": item_id,
        "collection": collection,
        "geometry": mapping(FOOTPRINT),
        "bbox": list(FOOTPRINT.bounds),
        "properties": properties,
        "links": _links(collection, item_id),
        "assets": assets,
    }


def saved_pc_items() -> list[dict]:
    """Items of Planetary Computer's shape, for 2024: S2 L2A, S1 RTC, Copernicus DEM."""
    transform = [10.0, 0.0, 399960.0, 0.0, -10.0, 7500000.0]
    s2 = _feature(
        "S2B_MSIL2A_20240715T203849_R085_T08WMB_20240716T000105",
        "sentinel-2-l2a",
        {
            "datetime": "2024-07-15T20:38:49.024000Z",
            "platform": "Sentinel-2B",
            "eo:cloud_cover": 3.2,
            "proj:epsg": 32608,
            "s2:processing_baseline": "05.10",
            "s2:mgrs_tile": "08WMB",
        },
        {
            **{b: _asset(b, **{"proj:shape": [10980, 10980], "proj:transform": transform, "gsd": 10.0})
               for b in ("B02", "B03", "B04", "B08")},
            "SCL": _asset("SCL", **{"proj:shape": [5490, 5490], "gsd": 20.0}),
            "visual": _asset("TCI"),
            "rendered_preview": {"href": f"{PC}/data/item/preview.png", "type": "image/png", "roles": ["overview"]},
        },
    )
    s1 = _feature(
        "S1A_IW_GRDH_1SDV_20240719T025904_20240719T025929_054846_06AD3A_rtc",
        "sentinel-1-rtc",
        {
            "datetime": None,
            "start_datetime": "2024-07-19 02:59:04.220006+00:00",
            "end_datetime": "2024-07-19 02:59:29.219545+00:00",
            "platform": "SENTINEL-1A",
            "proj:code": "EPSG:32608",
            "proj:shape": [14000, 20000],
            "sar:polarizations": ["VV", "VH"],
        },
        {"vv": _asset("vv"), "vh": _asset("vh")},
    )
    dem = _feature(
        "Copernicus_DSM_COG_10_N67_00_W136_00_DEM",
        "cop-dem-glo-30",
        {
            "datetime": "2021-04-22T00:00:00Z",
            "platform": "TanDEM-X",
            "proj:code": "EPSG:4326",
            "proj:shape": [3600, 1200],
        },
        {"data": _asset("dem")},
    )
    return [s2, s1, dem]


def write_collection(path: Path, features: list[dict]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.fixture(scope="module")
def saved_region(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    aoi = root / "peel.geojson"
    aoi.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": mapping(AOI_LONLAT)}]}))
    catalog = write_collection(root / "items.json", saved_pc_items())
    model = make_constant_detector(
        root / "constant.onnx", [ConstantDetection(box=(40, 40, 80, 90), score=0.9)],
        model_metadata(tile_size=128, max_detections=4),
    )
    return {"root": root, "aoi": aoi, "catalog": catalog, "model": model}


def _config(region_aoi, catalog, **changes) -> RunConfig:
    values = dict(aoi=str(region_aoi), years=(2024,), catalog=str(catalog), profile=None,
                  grid=GridConfig(overlap_px=8, tiles_per_chunk=1))
    values.update(changes)
    return RunConfig(**values)


def _main(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the command line in this process; return its exit status, stdout and stderr."""
    with pytest.raises(SystemExit) as exited:
        main(args)
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith(("[rtsmap]", "warning:"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- the profile rule ---------------------------------------------------------------------------


def test_profile_inferred_from_collections_and_assets(demo_region, saved_region, tmp_path):
    assert infer_profile(open_catalog(demo_region.items)).name == "demo"
    assert infer_profile(open_catalog(saved_region["catalog"])).name == "planetary-computer"
    # Earth Search's Sentinel-2 items name their assets blue/green/red/nir: not Planetary Computer's.
    s2 = dict(saved_pc_items()[0])
    s2["assets"] = {k: _asset(k) for k in ("blue", "green", "red", "nir", "scl")}
    dem = saved_pc_items()[2]
    es = write_collection(tmp_path / "es.json", [s2, dem])
    assert infer_profile(open_catalog(es)).name == "earth-search"
    other = dict(saved_pc_items()[0], collection="landsat-c2-l2")
    unknown = write_collection(tmp_path / "landsat.json", [other])
    with pytest.raises(ConfigError, match=r"no shipped profile fits .*landsat-c2-l2.*give --profile"):
        infer_profile(open_catalog(unknown))


def test_plan_and_run_plan_the_same_chunks_and_items(demo_region, tmp_path):
    """``rtsmap plan`` and ``rtsmap run`` go through one planning path: same chunks, same items."""
    from rtsmap.workflows.run import make_plan

    config = _config(demo_region.aoi, demo_region.items, years=(2021, 2022), out=str(tmp_path / "inv.gpkg"))
    report = plan_report(config)
    run_plan = make_plan(config)
    assert report["profile"] == "demo" and run_plan.planned.profile.name == "demo"
    assert report["grid"]["tile_px"] == run_plan.spec.tile_px == 128  # the demo model's
    chunk_ids = sorted(c.id for c in run_plan.iter_chunks())
    assert report["chunk_ids"] == chunk_ids and len(chunk_ids) >= 2
    for key, ids in run_plan.planned.item_ids().items():
        modality, year = key.split(":")
        assert report["items"][modality]["static" if year == "None" else year] == len(ids) > 0
    # One task per chunk, all its years; the chunks a task gets no item of are the plan's "chunks with no item".
    tasks = run_plan.tasks
    assert sorted(t.chunk.id for t in tasks) == chunk_ids and all(t.years == (2021, 2022) for t in tasks)
    for task in tasks:
        for year in task.years:
            for modality, items in task.items[year].items():
                label = "static" if modality == "dem" else str(year)
                assert (not items) == (task.chunk.id in report["missing"][modality][label])
                assert all(not json.loads(d).get("links") for d in items)  # slim items: nothing to resolve
    # The command line says the same as the function.
    code = subprocess.run(
        [sys.executable, "-m", "rtsmap.workflows.cli", "plan", "--aoi", str(demo_region.aoi), "--years", "2021-2022",
         "--catalog", str(demo_region.items), "--overlap-px", "8", "--tiles-per-chunk", "1", "--json"],
        capture_output=True, text=True, timeout=120, env=ENV,
    )
    assert code.returncode == 0, code.stderr
    assert json.loads(code.stdout)["chunk_ids"] == report["chunk_ids"]


# --- no silent empty runs -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["plan", "run"])
def test_no_item_for_a_needed_modality_ends_with_exit_2(demo_region, tmp_path, capsys, command):
    """The demo region's catalog searched with the Planetary Computer profile finds nothing."""
    args = [command, "--aoi", str(demo_region.aoi), "--years", "2021", "--catalog", str(demo_region.items),
            "--profile", "planetary-computer"]
    if command == "run":
        args += ["--out", str(tmp_path / "inv.gpkg")]
    started = time.monotonic()
    code, out, err = _main(args, capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "sentinel-2-l2a" in line and "rtsmap-demo-s2-l2a" in line and "--profile" in line
    assert time.monotonic() - started < 60
    assert not (tmp_path / "inv.gpkg").exists() and not (tmp_path / "inv.gpkg.work").exists()


def test_unknown_local_catalog_asks_for_profile(saved_region, tmp_path, capsys):
    other = dict(saved_pc_items()[0], collection="landsat-c2-l2")
    catalog = write_collection(tmp_path / "landsat.json", [other])
    code, _, err = _main(["plan", "--aoi", str(saved_region["aoi"]), "--years", "2024", "--catalog", str(catalog)], capsys)
    assert code == 2
    assert "landsat-c2-l2" in _one_error_line(err)


def test_demo_model_on_real_profile_warns_once(saved_region, capsys):
    code, out, err = _main(["plan", "--aoi", str(saved_region["aoi"]), "--years", "2024",
                            "--catalog", str(saved_region["catalog"]), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["profile"] == "planetary-computer"
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "synthetic" in warnings[0]
    # An explicit model: no warning.
    code, out, err = _main(["plan", "--aoi", str(saved_region["aoi"]), "--years", "2024",
                            "--catalog", str(saved_region["catalog"]), "--model", str(saved_region["model"])], capsys)
    assert code == 0 and "warning" not in err
    # The warning is the planning path's, so `rtsmap run` gives it too.
    planned = plan_chunks(_config(saved_region["aoi"], saved_region["catalog"], profile="planetary-computer"))
    assert len(planned.warnings) == 1 and "synthetic" in planned.warnings[0]


# --- checks before work starts ------------------------------------------------------------------


def test_run_refuses_bad_outputs_and_inputs_before_work(demo_region, tmp_path, capsys):
    base = ["run", "--aoi", str(demo_region.aoi), "--years", "2021", "--catalog", str(demo_region.items)]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [
        (["--workers", "0", "--out", str(tmp_path / "inv.gpkg")], "--workers must be at least 1"),
        (["--workers", "-3", "--out", str(tmp_path / "inv.gpkg")], "--workers must be at least 1"),
        (["--out", str(tmp_path / "inventory.txt")], "must end in .gpkg"),
        (["--out", str(blocker / "sub" / "inv.gpkg")], "is a file, not a folder"),
        (["--truth", str(tmp_path / "missing.gpkg"), "--out", str(tmp_path / "inv.gpkg")], "--truth"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((["--out", str(locked / "inv.gpkg")], "not writable"))
    for extra, message in cases:
        started = time.monotonic()
        code, _, err = _main(base + extra, capsys)
        assert code == 2, (extra, err)
        assert message in _one_error_line(err), extra
        assert time.monotonic() - started < 30, extra  # no catalog search, no cluster
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "locked"]
    locked.chmod(0o700)
    # A missing folder that can be created is fine (created when the inventory is written).
    from rtsmap.workflows.run import check_run_inputs

    check_run_inputs(RunConfig(aoi=str(demo_region.aoi), out=str(tmp_path / "new" / "inv.gpkg")))
    existing = tmp_path / "old.gpkg"
    existing.write_bytes(b"")
    with pytest.raises(OutputError, match="exists"):
        check_run_inputs(RunConfig(aoi=str(demo_region.aoi), out=str(existing)))


def test_training_data_refuses_bad_truth_and_out(demo_region, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    base = ["training-data", "--aoi", str(demo_region.aoi), "--catalog", str(demo_region.items)]
    code, _, err = _main(base + ["--truth", str(tmp_path / "none.gpkg"), "--out", str(tmp_path / "chips")], capsys)
    assert code == 2 and "--truth" in _one_error_line(err) and "does not exist" in err
    code, _, err = _main(base + ["--truth", str(demo_region.truth), "--out", str(blocker / "chips")], capsys)
    assert code == 2 and "is a file, not a folder" in _one_error_line(err)
    assert not (tmp_path / "chips").exists()


# --- one signer per process ---------------------------------------------------------------------


def test_tasks_in_one_process_share_one_signer(demo_region, saved_region, tmp_path):
    """Two chunk tasks of a signed catalog, in this process: the signer is built once."""
    from rtsmap.workflows.run import make_plan
    from rtsmap.workflows.tasks import process_chunk, signed_items

    config = _config(demo_region.aoi, demo_region.items, profile="demo", years=(2021,), model=str(saved_region["model"]),
                     out=str(tmp_path / "inv.gpkg"), inference=InferenceConfig(batch_size=4, threads=1),
                     cluster=ClusterConfig(n_workers=1))
    plan = make_plan(config)
    assert len(plan.tasks) >= 2
    # The demo catalog is unsigned; sign its tasks as a Planetary Computer run would. Local hrefs
    # are outside Azure Blob Storage, so the signer leaves them as they are (no token fetched).
    from dataclasses import replace

    tasks = [replace(t, signing="planetary-computer") for t in plan.tasks[:2]]
    shared_signer.cache_clear()
    records = [r for t in tasks for r in process_chunk(t)]
    assert [r["status"] for r in records] == ["processed", "processed"], records
    info = shared_signer.cache_info()
    # built once by the first task (its static and its per-year items), reused by the second
    assert info.misses == 1 and info.hits == 3
    first = signed_items(tasks[0], 2021)
    assert first["optical"][0].assets["blue"].href.startswith(str(demo_region.root))


# --- saved catalogs work offline ----------------------------------------------------------------


def test_saved_catalog_plans_without_network(saved_region):
    planned = plan_chunks(_config(saved_region["aoi"], saved_region["catalog"], model=str(saved_region["model"])))
    assert planned.profile.name == "planetary-computer" and planned.catalog.signing == "planetary-computer"
    ((block, records),) = [(b.block, planned.items.block_records(b.block)) for b in planned.iter_blocks()]
    found = {k: [r.to_item() for r in v] for k, v in records.items()}
    s1 = found["sar:2024"][0]
    assert s1.links == [] and s1.properties["start_datetime"] == "2024-07-19T02:59:04.220006Z"
    s2 = found["optical:2024"][0]
    assert sorted(s2.assets) == ["B02", "B03", "B04", "B08", "SCL"]  # only what the loader reads
    assert s2.properties["s2:processing_baseline"] == "05.10"
    # pystac reads projection v1 (proj:epsg) as v2 (proj:code); the slim item keeps the CRS and extension.
    assert s2.properties["proj:code"] == "EPSG:32608"
    assert any("projection" in url for url in s2.stac_extensions)
    assert s2.assets["B02"].extra_fields["proj:transform"][0] == 10.0
    assert found["dem:None"][0].properties["proj:code"] == "EPSG:4326"
    s2.to_dict()  # with links resolved this would go to the network and fail


def test_saved_catalog_runs_offline_to_a_clean_partial_result(saved_region, tmp_path):
    out = tmp_path / "inv.gpkg"
    config = tmp_path / "run.yaml"
    config.write_text("grid: {overlap_px: 8, tiles_per_chunk: 1}\ninference: {threads: 1}\ncluster: {timeout_s: 60}\n")
    args = [sys.executable, "-m", "rtsmap.workflows.cli", "run", "--aoi", str(saved_region["aoi"]), "--years", "2024",
            "--catalog", str(saved_region["catalog"]), "--model", str(saved_region["model"]), "--config", str(config),
            "--workers", "1", "--out", str(out)]
    started = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr and "STACError" not in proc.stderr
    assert "PARTIAL" in proc.stdout
    cov = pyogrio.read_dataframe(out, layer="coverage_2024")
    assert len(cov) >= 1 and set(cov["status"]) == {"failed"}
    for reason in cov["reason"]:
        assert "nonexistent.invalid" in reason and "cannot read asset" in reason, reason
    # The first read names the network; GDAL caches a failed URL per process, so a later chunk's
    # read of the same URL in the same worker says only that it does not exist.
    assert any("resolve host" in reason or "network" in reason for reason in cov["reason"]), list(cov["reason"])
    assert time.monotonic() - started < 240
    from rtsmap.pipeline.inventory import read_run_metadata

    meta = read_run_metadata(out)
    assert meta["region_name"] == "peel" and meta["model"]["name"] == "test-detector"
    assert meta["profile"] == "planetary-computer"
