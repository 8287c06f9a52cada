"""Searches against a real STAC API as Planetary Computer runs it: stac-fastapi-pgstac on
PostgreSQL + PostGIS (``tests/servers/pgstac.py``), loaded with the demo region's collections and
items by pypgstac.

The API must answer every search with the items the local catalog gives: by POST and GET, with
the CQL2 filter and the query extensions, page after page by token (small pages, so every search
here takes several), through pystac-client, through the project's ``open_catalog`` per modality
and year, and through ``rtsmap plan``. Skipped with the reason where PostgreSQL, PostGIS or the
servers venv is missing (``.ci/run`` installs the first two, ``make servers`` the third).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pystac
import pytest
import requests
from shapely.geometry import mapping

from rtsmap.pipeline.aoi import read_aoi
from rtsmap.pipeline.profiles import load_profile
from rtsmap.pipeline.stac import open_catalog, search_modalities
from tests.servers.pgstac import pgstac_api, why_not

REPO = Path(__file__).resolve().parents[1]
YEARS = (2021, 2022, 2023)
S2, S1, DEM = "rtsmap-demo-s2-l2a", "rtsmap-demo-s1-rtc", "rtsmap-demo-dem"
MAX_CLOUD = 20.0

WHY_NOT = why_not()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))


@pytest.fixture(scope="module")
def api(demo_region):
    """stac-fastapi-pgstac serving the demo region (collections and items), for this module.

    A server that is installed but does not start skips the tests with the cause on a
    developer's machine, and fails them in CI (``CI`` set), where ``.ci/run`` installed it.
    """
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(pgstac_api(demo_region.collections, [demo_region.items_ndjson]))
        except RuntimeError as exc:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"the pgstac STAC API did not start: {exc}")
        print(f"\npgstac API up in {server.timings['total']:.1f} s: {server.timings}")
        yield server


@pytest.fixture(scope="module")
def local_items(demo_region) -> list[pystac.Item]:
    return list(pystac.ItemCollection.from_file(str(demo_region.items)))


@pytest.fixture(scope="module")
def client(api):
    import pystac_client

    return pystac_client.Client.open(api.url)


def _timed(what: str, fn):
    start = time.perf_counter()
    out = fn()
    print(f"{what}: {time.perf_counter() - start:.3f} s")
    return out


def test_conforms_to_item_search_filter_and_query(client):
    from pystac_client.conformance import ConformanceClasses

    for cls in (ConformanceClasses.ITEM_SEARCH, ConformanceClasses.FILTER, ConformanceClasses.QUERY):
        assert client.conforms_to(cls), cls.name
    assert sorted(c.id for c in client.get_collections()) == sorted([S2, S1, DEM])


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_pages_by_token_give_every_item_once(client, local_items, method):
    limit = 3
    search = client.search(collections=[S2, S1, DEM], limit=limit, method=method)
    pages = _timed(f"{method} all items, limit {limit}", lambda: list(search.pages()))
    ids = [item.id for page in pages for item in page.items]
    assert len(pages) == math.ceil(len(local_items) / limit) == 3
    assert all(len(page.items) == limit for page in pages[:-1])
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(it.id for it in local_items)


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_next_link_carries_a_token(api, method):
    """The paging is the server's own: each ``next`` link holds a ``token`` (in the body for POST)."""
    if method == "POST":
        first = requests.post(f"{api.url}/search", json={"collections": [S2], "limit": 1}, timeout=10).json()
    else:
        first = requests.get(f"{api.url}/search", params={"collections": S2, "limit": 1}, timeout=10).json()
    nxt = next(link for link in first["links"] if link["rel"] == "next")
    assert nxt.get("method", "GET") == method
    token = nxt["body"]["token"] if method == "POST" else nxt["href"].split("token=")[1]
    assert token.startswith("next")
    if method == "POST":
        second = requests.post(nxt["href"], json=nxt["body"], timeout=10).json()
    else:
        second = requests.get(nxt["href"], timeout=10).json()
    assert len(first["features"]) == len(second["features"]) == 1
    assert first["features"][0]["id"] != second["features"][0]["id"]


@pytest.mark.parametrize(
    ("method", "kind"),
    [("POST", "cql2-json"), ("GET", "cql2-text"), ("POST", "query"), ("GET", "query")],
)
def test_cloud_filter_matches_local(client, local_items, demo_region, method, kind):
    """CQL2 filter and query extension on eo:cloud_cover, with the AOI and a time window, 1 item a page."""
    aoi = read_aoi(demo_region.aoi).geometry_wgs84
    kwargs = {"collections": [S2], "intersects": mapping(aoi), "datetime": "2021-01-01T00:00:00Z/2023-12-31T23:59:59Z",
              "limit": 1, "method": method}
    if kind == "cql2-json":
        kwargs |= {"filter": {"op": "<=", "args": [{"property": "eo:cloud_cover"}, MAX_CLOUD]}, "filter_lang": "cql2-json"}
    elif kind == "cql2-text":
        kwargs |= {"filter": f'"eo:cloud_cover" <= {MAX_CLOUD}', "filter_lang": "cql2-text"}
    else:
        kwargs |= {"query": {"eo:cloud_cover": {"lte": MAX_CLOUD}}}
    search = client.search(**kwargs)
    pages = _timed(f"{method} {kind} eo:cloud_cover <= {MAX_CLOUD}", lambda: list(search.pages()))
    got = sorted(item.id for page in pages for item in page.items)
    want = sorted(it.id for it in local_items if it.collection_id == S2 and it.properties["eo:cloud_cover"] <= MAX_CLOUD)
    assert got == want
    assert 0 < len(want) < sum(it.collection_id == S2 for it in local_items)  # the filter removes some
    assert len(pages) >= len(want)  # one item a page (the last page may be empty)


def test_open_catalog_gives_the_local_items_per_modality_and_year(api, demo_region):
    profile = load_profile(REPO / "workflows" / "profiles" / "demo.yaml")
    aoi = read_aoi(demo_region.aoi)
    local = search_modalities(open_catalog(demo_region.items), aoi, YEARS, profile)
    remote = _timed(
        "search_modalities over the API (7 searches, 1 item a page)",
        lambda: search_modalities(open_catalog(api.url), aoi, YEARS, profile, page_size=1),
    )
    assert set(remote) == set(local) == {(m, y) for m in ("optical", "sar") for y in YEARS} | {("dem", None)}
    for key in local:
        assert [it.id for it in remote[key]] == [it.id for it in local[key]], key
        assert local[key], key
        # What the loader reads of each item (assets, proj:*, datetimes) is the same too.
        for a, b in zip(remote[key], local[key]):
            assert a.to_dict(include_self_link=False, transform_hrefs=False) == b.to_dict(include_self_link=False, transform_hrefs=False)
    assert len(local[("optical", 2022)]) == 2


def _plan(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "rtsmap.workflows.cli", "plan", *args, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_plan_over_the_api_equals_plan_over_the_local_catalog(api, demo_region):
    # Small chunks, so that the plan has several.
    common = ["--aoi", str(demo_region.aoi), "--years", "2021-2023", "--profile", "demo",
              "--overlap-px", "8", "--tiles-per-chunk", "2"]
    local = _plan([*common, "--catalog", str(demo_region.items)])
    remote = _timed("rtsmap plan over the API", lambda: _plan([*common, "--catalog", api.url]))
    assert remote.pop("catalog") == api.url and local.pop("catalog") == str(demo_region.items)
    assert remote == local
    assert local["chunks"] > 1 and local["items"]["optical"] == {"2021": 1, "2022": 2, "2023": 1}
