"""STAC search against a real STAC API (rustac serve) and the local formats, with the same items.

The items are small pystac items built here (geometry, datetime, eo:cloud_cover, assets that
point nowhere): searching needs no rasters.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import logging
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pystac
import pytest
import rustac
from shapely.geometry import Point, box, mapping

from rtsmap.pipeline.errors import CatalogError, ConfigError
from rtsmap.pipeline.profiles import CatalogProfile, load_profile
from rtsmap.pipeline.stac import (
    open_catalog,
    redact,
    redact_text,
    search_modalities,
    season_window,
)
try:  # tests/ is a plain folder on sys.path under pytest's default import mode
    from stac_server import free_port, rustac_server
except ImportError:  # or a package, if tests/__init__.py appears
    from tests.stac_server import free_port, rustac_server

UTC = dt.timezone.utc
S2 = "test-s2"
S1 = "test-s1"
DEM = "test-dem"


def _item(item_id, collection, geom, when=None, props=None):
    props = dict(props or {})
    item = pystac.Item(
        id=item_id,
        geometry=mapping(geom),
        bbox=list(geom.bounds),
        datetime=when,
        properties=props,
        collection=collection,
    )
    item.add_asset("data", pystac.Asset(href=f"/nowhere/{item_id}.tif", media_type=pystac.MediaType.COG))
    return item


def build_items() -> list[pystac.Item]:
    """Items placed so each filter has something to keep and something to drop."""
    near = box(-135.5, 67.3, -135.1, 67.5)  # overlaps the AOI below
    east = box(-135.15, 67.35, -134.8, 67.55)  # overlaps the AOI's east end
    far = box(-120.0, 60.0, -119.5, 60.3)  # nowhere near
    items = [
        _item("s2-2021-a", S2, near, dt.datetime(2021, 7, 1, 0, 0, 0, tzinfo=UTC), {"eo:cloud_cover": 5.0}),
        _item("s2-2021-b", S2, east, dt.datetime(2021, 7, 20, 20, 0, tzinfo=UTC), {"eo:cloud_cover": 35.0}),
        _item("s2-2021-c", S2, near, dt.datetime(2021, 8, 31, 23, 0, tzinfo=UTC), {"eo:cloud_cover": 80.0}),
        _item("s2-2021-d", S2, near, dt.datetime(2021, 8, 10, tzinfo=UTC), {}),  # no cloud cover
        _item("s2-2021-june", S2, near, dt.datetime(2021, 6, 30, 23, 59, tzinfo=UTC), {"eo:cloud_cover": 1.0}),
        _item("s2-2021-sep", S2, near, dt.datetime(2021, 9, 1, 0, 0, tzinfo=UTC), {"eo:cloud_cover": 1.0}),
        _item("s2-2021-far", S2, far, dt.datetime(2021, 7, 15, tzinfo=UTC), {"eo:cloud_cover": 0.0}),
        _item("s2-2022-a", S2, east, dt.datetime(2022, 7, 12, tzinfo=UTC), {"eo:cloud_cover": 12.5}),
        _item("s2-2022-b", S2, near, dt.datetime(2022, 8, 2, tzinfo=UTC), {"eo:cloud_cover": 40.0}),
        _item("s1-2021-a", S1, near, dt.datetime(2021, 7, 7, tzinfo=UTC)),
        _item("s1-2022-a", S1, east, dt.datetime(2022, 8, 1, tzinfo=UTC)),
        # DEM mosaics: a range and no datetime, like ArcticDEM mosaic tiles
        _item("dem-a", DEM, near, None, {"start_datetime": "2010-01-01T00:00:00Z", "end_datetime": "2017-12-31T00:00:00Z"}),
        _item("dem-b", DEM, east, None, {"start_datetime": "2011-01-01T00:00:00Z", "end_datetime": "2019-12-31T00:00:00Z"}),
        _item("dem-far", DEM, far, None, {"start_datetime": "2011-01-01T00:00:00Z", "end_datetime": "2019-12-31T00:00:00Z"}),
    ]
    return items


AOI = box(-135.4, 67.38, -135.0, 67.45)


@pytest.fixture(scope="module")
def stac_files(tmp_path_factory) -> dict[str, Path]:
    """The same items as ItemCollection JSON, NDJSON, a static catalog and stac-geoparquet."""
    root = tmp_path_factory.mktemp("stac")
    items = build_items()
    files: dict[str, Path] = {}
    collection_files = []
    for cid in (S2, S1, DEM):
        coll = pystac.Collection(
            id=cid,
            description=f"test collection {cid}",
            extent=pystac.Extent(pystac.SpatialExtent([[-180, -90, 180, 90]]), pystac.TemporalExtent([[None, None]])),
        )
        path = root / f"collection-{cid}.json"
        path.write_text(json.dumps(coll.to_dict(include_self_link=False)))
        collection_files.append(path)
    dicts = [it.to_dict(include_self_link=False) for it in items]
    files["json"] = root / "items.json"
    files["json"].write_text(json.dumps({"type": "FeatureCollection", "features": dicts}))
    files["ndjson"] = root / "items.ndjson"
    files["ndjson"].write_text("\n".join(json.dumps(d) for d in dicts) + "\n")
    files["parquet"] = root / "items.parquet"
    rustac.write_sync(str(files["parquet"]), dicts)
    catalog = pystac.Catalog(id="test", description="static test catalog")
    for cid in (S2, S1, DEM):
        coll = pystac.Collection(
            id=cid,
            description=cid,
            extent=pystac.Extent(pystac.SpatialExtent([[-180, -90, 180, 90]]), pystac.TemporalExtent([[None, None]])),
        )
        for it in build_items():
            if it.collection_id == cid:
                coll.add_item(it)
        catalog.add_child(coll)
    catalog.normalize_hrefs(str(root / "static"))
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    files["static"] = root / "static" / "catalog.json"
    files["collections"] = collection_files
    return files


@pytest.fixture(scope="module")
def api_url(stac_files):
    with rustac_server([*stac_files["collections"], stac_files["json"]]) as url:
        yield url


def _ids(items):
    return [it.id for it in items]


# --- API searches ---------------------------------------------------------------------------------


def test_server_pages_and_client_walks_them(api_url):
    # The server really paginates at limit=2 (a next link), so a search for more walks pages.
    request = urllib.request.Request(
        f"{api_url}/search",
        data=json.dumps({"collections": [S2], "limit": 2}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as resp:
        page = json.load(resp)
    assert len(page["features"]) == 2
    assert any(link["rel"] == "next" for link in page["links"])
    catalog = open_catalog(api_url)
    items = catalog.search([S2], page_size=2)
    assert _ids(items) == sorted(it.id for it in build_items() if it.collection_id == S2)
    assert len(items) == 9


def test_api_intersects_datetime_and_cloud(api_url):
    catalog = open_catalog(api_url)
    window = season_window(2021, ("07-01", "08-31"))
    # intersects + season: June 30 and September 1 fall out, the far item falls out
    got = catalog.search([S2], intersects=AOI, datetime=window, page_size=2)
    assert _ids(got) == ["s2-2021-a", "s2-2021-b", "s2-2021-c", "s2-2021-d"]
    # + cloud: 80% is too cloudy, the item with no cloud cover is left out
    got = catalog.search([S2], intersects=AOI, datetime=window, cloud_property="eo:cloud_cover", max_cloud=40, page_size=2)
    assert _ids(got) == ["s2-2021-a", "s2-2021-b"]
    # a point only the east footprint covers
    got = catalog.search([S2], intersects=Point(-134.9, 67.5), page_size=2)
    assert _ids(got) == ["s2-2021-b", "s2-2022-a"]
    # GeoJSON dicts work as well as shapely geometries
    assert _ids(catalog.search([S2], intersects=mapping(Point(-134.9, 67.5)))) == _ids(got)


def test_search_modalities_per_year_and_static(api_url, tmp_path):
    profile_path = tmp_path / "p.yaml"
    profile_path.write_text(
        f"""
name: test
url: null
modalities:
  optical:
    collections: [{S2}]
    season: ["07-01", "08-31"]
    cloud_property: eo:cloud_cover
    max_cloud: 40
    bands: [{{name: red, asset: data}}]
  sar:
    collections: [{S1}]
    season: ["07-01", "08-31"]
    bands: [{{name: vv, asset: data, transform: db}}]
  dem:
    collections: [{DEM}]
    per_year: false
    bands: [{{name: elevation, asset: data}}]
"""
    )
    profile = load_profile(profile_path)
    found = search_modalities(open_catalog(api_url), AOI, [2022, 2021], profile, page_size=2)
    assert {k: _ids(v) for k, v in found.items()} == {
        ("optical", 2021): ["s2-2021-a", "s2-2021-b"],
        ("optical", 2022): ["s2-2022-a", "s2-2022-b"],
        ("sar", 2021): ["s1-2021-a"],
        ("sar", 2022): ["s1-2022-a"],
        ("dem", None): ["dem-a", "dem-b"],
    }


# --- local formats give the API's answers -------------------------------------------------------

QUERIES = [
    dict(collections=[S2]),
    dict(collections=[S2], intersects=AOI),
    dict(collections=[S2], intersects=AOI, datetime=season_window(2021, ("07-01", "08-31"))),
    dict(collections=[S2], datetime=(dt.datetime(2021, 8, 31, 23, 0, tzinfo=UTC), None)),
    dict(collections=[S2, S1], intersects=AOI, datetime=season_window(2022, ("07-01", "08-31"))),
    dict(collections=[S2], cloud_property="eo:cloud_cover", max_cloud=35),
    dict(collections=[DEM], intersects=AOI),
    dict(collections=[DEM], datetime=(dt.datetime(2018, 1, 1, tzinfo=UTC), dt.datetime(2018, 2, 1, tzinfo=UTC))),
    dict(collections=[DEM], datetime=(dt.datetime(2005, 1, 1, tzinfo=UTC), dt.datetime(2009, 1, 1, tzinfo=UTC))),
]


@pytest.mark.parametrize("fmt", ["json", "ndjson", "static", "parquet"])
def test_local_formats_match_api(api_url, stac_files, fmt):
    api = open_catalog(api_url)
    local = open_catalog(stac_files[fmt])
    answers = []
    for query in QUERIES:
        expected = _ids(api.search(page_size=3, **query))
        got = _ids(local.search(**query))
        assert got == expected, query
        answers.append(len(got))
    # the queries are not all trivially empty or all-equal
    assert min(answers) == 0 and max(answers) == 9 and len(set(answers)) >= 4


def test_local_catalog_errors(tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        open_catalog(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CatalogError, match="not valid JSON"):
        open_catalog(bad)
    other = tmp_path / "other.json"
    other.write_text('{"type": "Something"}')
    with pytest.raises(CatalogError, match="not STAC"):
        open_catalog(other)


# --- a catalog that is down, broken, or slow ----------------------------------------------------


class _Counting(http.server.BaseHTTPRequestHandler):
    """Answers every request with 500 and counts them."""

    hits = 0

    def do_GET(self):
        type(self).hits += 1
        self.send_response(500)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"internal error")

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def server_500():
    handler = type("Handler500", (_Counting,), {"hits": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


@pytest.fixture
def hanging_server():
    """Accepts connections and never answers (until closed)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    accepted = []
    stop = threading.Event()

    def accept():
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                accepted.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", accepted
    stop.set()
    thread.join(timeout=2)
    for conn in accepted:
        conn.close()
    sock.close()


def test_catalog_down_fails_after_retries_quickly():
    url = f"http://127.0.0.1:{free_port()}/"
    start = time.monotonic()
    with pytest.raises(CatalogError) as err:
        open_catalog(url, retries=2, backoff=0.01, timeout=2)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "is unreachable" in message and "connection refused" in message and "after 3 tries" in message


def test_catalog_answering_500_is_retried(server_500):
    url, handler = server_500
    with pytest.raises(CatalogError, match=r"unreachable: HTTP 500 after 4 tries"):
        open_catalog(url, retries=3, backoff=0.01, timeout=2)
    assert handler.hits == 4


def test_catalog_hanging_times_out(hanging_server):
    url, accepted = hanging_server
    start = time.monotonic()
    with pytest.raises(CatalogError, match=r"unreachable: timed out after 2 tries"):
        open_catalog(url, retries=1, backoff=0.01, timeout=0.3)
    assert 0.5 < time.monotonic() - start < 5
    assert len(accepted) == 2


# --- secrets stay out of messages and logs ------------------------------------------------------


def test_redact():
    signed = "https://acct.blob.core.windows.net/c/a/b.tif?st=2024-01-01&se=2024-01-02&sp=rl&sig=SECRET%3D"
    assert redact(signed) == "https://acct.blob.core.windows.net/c/a/b.tif?..."
    assert redact("https://user:pw@host.org:8443/x?token=SECRET#frag") == "https://host.org:8443/x?..."
    assert redact("https://earth-search.aws.element84.com/v1") == "https://earth-search.aws.element84.com/v1"
    assert redact("/data/items.json") == "/data/items.json"
    text = f"failed to read {signed} (HTTP 403), retry with url: /search?sig=SECRET"
    assert "SECRET" not in redact_text(text)
    assert "https://acct.blob.core.windows.net/c/a/b.tif" in redact_text(text)
    assert "SECRET" not in redact_text("token sv=2021&sig=SECRET&se=x")


def test_secrets_not_in_errors_or_logs(caplog):
    caplog.set_level(logging.DEBUG)
    url = f"http://127.0.0.1:{free_port()}/stac?subscription-key=SECRET"
    with pytest.raises(CatalogError) as err:
        open_catalog(url, retries=1, backoff=0.01, timeout=1, headers={"Authorization": "Bearer SECRET"})
    assert "SECRET" not in str(err.value)
    assert "127.0.0.1" in str(err.value)
    assert caplog.records, "the HTTP libraries logged nothing: the check below would prove nothing"
    assert "SECRET" not in caplog.text


# Signing tests live in tests/test_remote.py (pipeline/signing.py, against a local SAS endpoint).


# --- profiles -----------------------------------------------------------------------------------


def test_shipped_profiles_load():
    root = Path(__file__).resolve().parents[1] / "workflows" / "profiles"
    names = {p.stem: load_profile(p) for p in root.glob("*.yaml")}
    assert {"demo", "earth-search", "planetary-computer", "arcticdem-pgc"} <= set(names)
    demo = names["demo"]
    assert demo.url is None
    assert demo.modalities["optical"].collections == ("rtsmap-demo-s2-l2a",)
    assert [b.asset for b in demo.modalities["optical"].bands] == ["blue", "green", "red", "nir"]
    assert demo.modalities["optical"].mask.asset == "scl"
    assert {b.transform for b in demo.modalities["sar"].bands} == {"db"}
    assert demo.modalities["dem"].band_names == ("slope", "hillshade", "relative_elevation")
    assert demo.modalities["dem"].per_year is False
    pc = names["planetary-computer"]
    assert pc.signing == "planetary-computer"
    assert [b.asset for b in pc.modalities["optical"].bands] == ["B02", "B03", "B04", "B08"]
    assert "sar" not in names["earth-search"].modalities


@pytest.mark.parametrize(
    "body, key",
    [
        ("name: x\nmodalities: {dem: {collections: [c], bands: [{name: e, asset: d}], per_year: false, max_clouds: 3}}", "modalities.dem.max_clouds"),
        ("name: x\nmodalities: {dem: {collections: c, bands: [{name: e, asset: d}], per_year: false}}", "modalities.dem.collections"),
        ("name: x\nmodalities: {dem: {collections: [c], bands: [{name: e, asset: d, scale: big}], per_year: false}}", "modalities.dem.bands[0].scale"),
        ("name: x\nmodalities: {opt: {collections: [c], bands: [{name: e, asset: d}]}}", "modalities.opt.season"),
        ("name: x\nmodalities: {opt: {collections: [c], bands: [{name: e, asset: d}], season: [07-01, 13-01]}}", "modalities.opt.season"),
        ("name: x\nmodalities: {dem: {collections: [c], bands: [{name: e, asset: d, kind: class, resampling: bilinear}], per_year: false}}", "modalities.dem.bands[0].resampling"),
        ("name: x\nurl: 3\nmodalities: {}", "profile.url"),
        ("nam: x\nmodalities: {}", "profile.nam"),
    ],
)
def test_profile_validation_names_key_and_file(tmp_path, body, key):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_band_scale_offset_rules():
    from rtsmap.pipeline.profiles import band_scale_offset

    pc = load_profile(Path(__file__).resolve().parents[1] / "workflows" / "profiles" / "planetary-computer.yaml")
    optical = pc.modalities["optical"]
    blue = optical.bands[0]
    assert band_scale_offset(optical, blue, {"s2:processing_baseline": "05.09"}) == (0.0001, -0.1)
    assert band_scale_offset(optical, blue, {"s2:processing_baseline": "03.01"}) == (0.0001, 0.0)
    assert band_scale_offset(optical, blue, {}) == (0.0001, 0.0)
    es = load_profile(Path(__file__).resolve().parents[1] / "workflows" / "profiles" / "earth-search.yaml")
    asset = {"raster:bands": [{"scale": 0.0001, "offset": -0.1}]}
    assert band_scale_offset(es.modalities["optical"], es.modalities["optical"].bands[0], {}, asset) == (0.0001, -0.1)
