"""Per-modality catalogs in one profile: each modality searched and signed in its own catalog.

The demo region's items are split into three catalogs, as a combined profile would take them
from three services: optical in an NDJSON file, SAR behind a real STAC API (``rustac serve``,
tests/stac_server.py), DEM in an ItemCollection JSON file. Planning and running with a profile
naming them must give what the single demo catalog gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyogrio
import pytest
import yaml

from rtsmap.pipeline.errors import CatalogError
from rtsmap.pipeline.profiles import load_profile
from rtsmap.pipeline.stac import ModalityCatalogs
from rtsmap.workflows.cli import main
from rtsmap.workflows.config import RunConfig
from rtsmap.workflows.planning import PROFILES_DIR, open_profile_catalog
from stac_server import free_port, rustac_server

DEMO = yaml.safe_load((PROFILES_DIR / "demo.yaml").read_text())
COLLECTION = {m: DEMO["modalities"][m]["collections"][0] for m in ("optical", "sar", "dem")}


def _split(demo_region, root: Path) -> dict[str, Path]:
    """The demo items by modality: optical.ndjson, sar.json (to serve), dem.json."""
    features = json.loads(demo_region.items.read_text())["features"]
    by = {m: [f for f in features if f["collection"] == c] for m, c in COLLECTION.items()}
    assert all(by.values()), "the demo region has items of every modality"
    files = {"optical": root / "optical.ndjson", "sar": root / "sar.json", "dem": root / "dem.json"}
    files["optical"].write_text("".join(json.dumps(f) + "\n" for f in by["optical"]))
    for m in ("sar", "dem"):
        files[m].write_text(json.dumps({"type": "FeatureCollection", "features": by[m]}))
    return files


def _profile(path: Path, catalogs: dict[str, str]) -> Path:
    """The demo profile with a catalog named per modality (relative paths: next to the profile)."""
    body = json.loads(json.dumps(DEMO))
    body["name"] = "demo-split"
    for m, where in catalogs.items():
        body["modalities"][m]["catalog"] = where
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def split(demo_region, tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    files = _split(demo_region, root)
    sar_collection = next(p for p in demo_region.collections if p.stem == COLLECTION["sar"])
    with rustac_server([sar_collection, files["sar"]]) as url:
        profile = _profile(root / "split.yaml", {"optical": "optical.ndjson", "sar": url, "dem": str(files["dem"])})
        yield {"root": root, "profile": profile, "sar_url": url, "files": files}


def _main(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(args)
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


def _plan(demo_region, capsys, *extra: str) -> dict:
    code, out, err = _main(["plan", "--aoi", str(demo_region.aoi), "--years", "2021-2022",
                            "--tiles-per-chunk", "1", "--json", *extra], capsys)
    assert code == 0, err
    return json.loads(out)


def test_profile_catalogs_open_per_modality(split):
    catalog, profile = open_profile_catalog(None, split["profile"])
    assert isinstance(catalog, ModalityCatalogs)
    sources = {m: catalog.for_modality(m).source for m in ("optical", "sar", "dem")}
    assert sources["optical"] == str(split["files"]["optical"])  # relative to the profile file
    assert sources["sar"] == split["sar_url"] and sources["dem"] == str(split["files"]["dem"])
    assert profile.catalogs() == sources
    # Every modality's catalog is named (redacted) in the one source text.
    assert all(f"{m}: {s}" in catalog.source for m, s in sources.items())
    # Only the modalities asked for are opened.
    single, _ = open_profile_catalog(None, split["profile"], ["dem"])
    assert not isinstance(single, ModalityCatalogs) and single.source == sources["dem"]


def test_plan_with_split_catalogs_equals_single_catalog(demo_region, split, capsys):
    single = _plan(demo_region, capsys, "--catalog", str(demo_region.items), "--profile", "demo")
    multi = _plan(demo_region, capsys, "--profile", str(split["profile"]))
    assert multi["chunks"] == single["chunks"] > 1 and multi["chunk_ids"] == single["chunk_ids"]
    assert multi["items"] == single["items"]
    assert all(n > 0 for per in multi["items"].values() for n in per.values())
    assert "sar: " + split["sar_url"] in multi["catalog"]
    # --catalog overrides every modality's catalog: the single file again.
    overridden = _plan(demo_region, capsys, "--profile", str(split["profile"]), "--catalog", str(demo_region.items))
    assert overridden["items"] == single["items"] and overridden["catalog"] == str(demo_region.items)


def _inventory(path: Path, year: int) -> tuple[int, float]:
    df = pyogrio.read_dataframe(path, layer=f"rts_{year}")
    return len(df), float(df.geometry.area.sum())


def test_run_with_split_catalogs_equals_single_catalog(demo_region, split, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("grid: {tiles_per_chunk: 1}\ninference: {threads: 1, batch_size: 4}\ncluster: {n_workers: 1, timeout_s: 120}\n")
    outs = {}
    for name, extra in {"single": ["--catalog", str(demo_region.items), "--profile", "demo"],
                        "multi": ["--profile", str(split["profile"])]}.items():
        outs[name] = tmp_path / f"{name}.gpkg"
        code, _, err = _main(["run", "--aoi", str(demo_region.aoi), "--years", "2022", "--config", str(config),
                              "--out", str(outs[name]), *extra], capsys)
        assert code == 0, err
    count, area = _inventory(outs["single"], 2022)
    assert count > 0
    multi_count, multi_area = _inventory(outs["multi"], 2022)
    assert multi_count == count and multi_area == pytest.approx(area, rel=1e-9)


def test_unreachable_modality_catalog_is_one_line_naming_it(demo_region, split, tmp_path, capsys):
    down = f"http://127.0.0.1:{free_port()}"
    profile = _profile(tmp_path / "down.yaml", {"optical": str(split["files"]["optical"]), "sar": down,
                                                "dem": str(split["files"]["dem"])})
    code, out, err = _main(["plan", "--aoi", str(demo_region.aoi), "--years", "2021", "--profile", str(profile)], capsys)
    assert code == 2 and out == ""
    lines = [line for line in err.strip().splitlines() if not line.startswith(("[rtsmap]", "warning:"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: the sar catalog of profile demo-split: ") and down in lines[0]
    assert "unreachable" in lines[0]
    with pytest.raises(CatalogError, match="the sar catalog"):
        open_profile_catalog(None, profile)


def test_shipped_combined_profile_names_three_catalogs():
    profile = load_profile(PROFILES_DIR / "arctic-combined.yaml")  # the strict reader
    catalogs = profile.catalogs()
    assert set(catalogs) == {"optical", "sar", "dem"} and len(set(catalogs.values())) == 3
    assert "earth-search" in catalogs["optical"] and "planetarycomputer" in catalogs["sar"]
    assert "pgc" in catalogs["dem"]
    signing = {m: p.signing for m, p in profile.modalities.items()}
    assert signing == {"optical": None, "sar": "planetary-computer", "dem": None}
    es = load_profile(PROFILES_DIR / "earth-search.yaml").modalities["optical"]
    optical = profile.modalities["optical"]
    assert (optical.bands, optical.mask, optical.offset_rule) == (es.bands, es.mask, es.offset_rule)
    pgc = load_profile(PROFILES_DIR / "arcticdem-pgc.yaml").modalities["dem"]
    assert profile.modalities["dem"].collections == pgc.collections and profile.modalities["dem"].bands == pgc.bands


def test_modality_settings_default_to_the_profiles(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: p\nurl: https://example.org/stac\nsigning: planetary-computer\nheaders: {X-Key: k}\n"
        "modalities:\n"
        "  dem: {collections: [c], bands: [{name: e, asset: d}], per_year: false}\n"
        "  sar: {collections: [s], bands: [{name: vv, asset: vv}], per_year: false, catalog: local.json,"
        " headers: {}}\n"
    )
    profile = load_profile(path)
    dem, sar = profile.modalities["dem"], profile.modalities["sar"]
    assert (dem.catalog, dem.signing, dem.headers) == ("https://example.org/stac", "planetary-computer", {"X-Key": "k"})
    assert (sar.catalog, sar.signing, sar.headers) == (str(tmp_path / "local.json"), "planetary-computer", {})
    path.write_text(path.read_text().replace("catalog: local.json", "catalogue: local.json"))
    with pytest.raises(Exception, match="modalities.sar.catalogue"):
        load_profile(path)


def test_tasks_sign_each_modality_with_its_own_scheme(monkeypatch):
    """The task's signing lookup is per modality (a recording signer stands in for the SAS service)."""
    import rtsmap.workflows.tasks as tasks
    from rtsmap.workflows.tasks import ChunkTask, signed_items

    profile = load_profile(PROFILES_DIR / "arctic-combined.yaml")
    used = []
    monkeypatch.setattr(tasks, "shared_signer", lambda scheme: lambda href, c: used.append((scheme, c)) or href + "?signed")
    item = {"type": "Feature", "stac_version": "1.0.0", "id": "i", "geometry": None, "properties": {"datetime": "2022-07-01T00:00:00Z"},
            "links": [], "assets": {"a": {"href": "https://x.invalid/a.tif"}}}
    items = {2022: {m: (json.dumps(dict(item, collection=m)).encode(),) for m in profile.modalities}}
    task = ChunkTask(chunk=None, years=(2022,), items=items, profiles=profile.modalities, model_path="", model_sha256="",
                     inference=None, store=None, core_wkb=b"", signing=None)
    got = signed_items(task, 2022)
    assert got["sar"][0].assets["a"].href.endswith("?signed")
    assert got["optical"][0].assets["a"].href == got["dem"][0].assets["a"].href == "https://x.invalid/a.tif"
    assert used == [("planetary-computer", "sar")]
