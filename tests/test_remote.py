"""Remote reads against real servers on 127.0.0.1: nginx (HTTP range reads), a fault-injecting
proxy in front of it (retries, errors that name their cause), moto's S3 server (``s3://`` via
``/vsis3/``) and a Planetary-Computer-style SAS token endpoint (signing with Microsoft's
``planetary-computer`` package, re-signing on HTTP 403).

Every test loads a chunk of the demo region through ``load_chunk`` exactly as a run does and
compares it with the same chunk loaded from local disk. Servers that are not installed skip their
tests with the reason (``.ci/run`` installs nginx; ``make servers`` installs moto).
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
import uuid
from pathlib import Path

import numpy as np
import pystac
import pytest

from rtsmap.pipeline.aoi import read_aoi
from rtsmap.pipeline.errors import AssetError, CatalogError, ConfigError
from rtsmap.pipeline.grid import GridSpec, plan_grid
from rtsmap.pipeline.load import gdal_options, load_chunk
from rtsmap.pipeline.profiles import CatalogProfile, load_profile
from rtsmap.pipeline.signing import make_signer, strip_sas
from rtsmap.workflows.http_serve import nginx_executable, serve_folder
from tests.servers.fault_proxy import fault_proxy
from tests.servers.moto_s3 import moto_executable, moto_server

REPO = Path(__file__).resolve().parents[1]
YEAR = 2022
BLOB_HOST = "rtsmapdemo.blob.core.windows.net"
CONTAINER = "demo"

needs_nginx = pytest.mark.skipif(nginx_executable() is None, reason="nginx is not installed (apt-get install nginx; .ci/run does)")


# --- inputs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def region(demo_region):
    """The demo region's profile, first chunk and 2022 items per modality."""
    profile = load_profile(REPO / "workflows" / "profiles" / "demo.yaml")
    chunk = plan_grid(read_aoi(demo_region.aoi).geometry, GridSpec())[0]
    items: dict[str, list[pystac.Item]] = {}
    for item in pystac.ItemCollection.from_file(str(demo_region.items)):
        modality = next(m for m, p in profile.modalities.items() if item.collection_id in p.collections)
        if not profile.modalities[modality].per_year or item.datetime.year == YEAR:
            items.setdefault(modality, []).append(item)
    return demo_region.root, profile, chunk, items


@pytest.fixture(scope="module")
def local_stack(region):
    root, profile, chunk, items = region
    return load_chunk(chunk, items, profile.modalities, YEAR)


def rehref(items: dict[str, list[pystac.Item]], root: Path, base: str, query: str = "") -> dict[str, list[pystac.Item]]:
    """Copies of the items whose hrefs point at ``base`` + the path under ``root`` (+ ``query``)."""
    out = {}
    for modality, modality_items in items.items():
        out[modality] = []
        for item in modality_items:
            item = item.clone()
            for asset in item.assets.values():
                asset.href = f"{base}/{Path(asset.href).relative_to(root).as_posix()}{query}"
            out[modality].append(item)
    return out


def assert_same(a, b, modalities=None) -> None:
    for m in modalities or a.data:
        np.testing.assert_array_equal(a.data[m], b.data[m], err_msg=m)
        np.testing.assert_array_equal(a.valid[m], b.valid[m], err_msg=m)
        assert a.item_ids[m] == b.item_ids[m]


# --- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nginx(region, tmp_path_factory):
    """nginx serving the demo region at ``/`` and, for blob-style paths, at ``/demo/``."""
    if nginx_executable() is None:
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run does)")
    root = region[0]
    site = tmp_path_factory.mktemp("site")
    (site / CONTAINER).symlink_to(root, target_is_directory=True)
    for child in root.iterdir():
        (site / child.name).symlink_to(child, target_is_directory=child.is_dir())
    with serve_folder(site, tmp_path_factory.mktemp("nginx")) as server:  # the package's own launcher
        yield server


@pytest.fixture
def proxy(nginx):
    with fault_proxy(nginx.url.removeprefix("http://")) as p:
        yield p


@pytest.fixture
def fast_retries(monkeypatch):
    """Short GDAL retry delays and timeouts (the environment wins over the loader's defaults)."""
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "3")
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "5")


# --- HTTP --------------------------------------------------------------------------------------


@needs_nginx
def test_chunk_over_http_equals_local(region, local_stack, nginx):
    root, profile, chunk, items = region
    before = len(nginx.log_lines())
    remote = load_chunk(chunk, rehref(items, root, nginx.url), profile.modalities, YEAR)
    assert_same(local_stack, remote)
    lines = nginx.log_lines()[before:]
    assert lines and all(line[2] in ("200", "206") for line in lines)
    # range reads: most requests carry a Range header and get 206
    assert sum(line[2] == "206" for line in lines) >= len(lines) // 2
    cog_bytes = sum(p.stat().st_size for p in root.rglob("*.tif"))
    assert sum(int(line[3]) for line in lines) < cog_bytes


@needs_nginx
def test_bursts_of_503_and_429_are_retried(region, local_stack, proxy, fast_retries):
    root, profile, chunk, items = region
    proxy.fail(2, 503)
    proxy.fail(1, 429)  # three failures: GDAL_HTTP_MAX_RETRY=3 retries get through
    remote = load_chunk(chunk, {"sar": rehref(items, root, proxy.url)["sar"]}, profile.modalities, YEAR)
    assert_same(local_stack, remote, ["sar"])
    assert [r.status for r in proxy.requests[:4]] == [503, 503, 429, 200]


@needs_nginx
def test_reset_connections_and_slow_answers_are_retried(region, local_stack, proxy, fast_retries, monkeypatch):
    root, profile, chunk, items = region
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "1")
    proxy.drop(1)
    proxy.delay(1, 2.5)  # longer than the timeout: curl gives up, GDAL retries
    proxy.delay(3, 0.2)  # slow but in time
    remote = load_chunk(chunk, {"sar": rehref(items, root, proxy.url)["sar"]}, profile.modalities, YEAR)
    assert_same(local_stack, remote, ["sar"])
    assert proxy.requests[0].status is None  # the reset one


@needs_nginx
def test_persistent_http_error_names_the_status_and_hides_the_token(region, proxy, fast_retries, caplog):
    caplog.set_level(logging.DEBUG)
    root, profile, chunk, items = region
    proxy.fail(100, 503)
    sar = rehref(items, root, proxy.url, "?sv=2021&sig=SECRET")["sar"]
    with pytest.raises(AssetError) as err:
        load_chunk(chunk, {"sar": sar}, profile.modalities, YEAR)
    message = str(err.value)
    assert "HTTP response code: 503" in message and "retries" in message
    assert sar[0].id in message
    assert "SECRET" not in message and "SECRET" not in caplog.text
    assert len(proxy.requests) == 4  # the first try and GDAL_HTTP_MAX_RETRY=3 retries


def test_network_error_names_the_cause(region, fast_retries):
    root, profile, chunk, items = region
    from tests.servers.common import free_port

    sar = rehref(items, root, f"http://127.0.0.1:{free_port()}")["sar"]  # nothing listens there
    with pytest.raises(AssetError, match="CURL error: Failed to connect") as err:
        load_chunk(chunk, {"sar": sar}, profile.modalities, YEAR)
    assert "does not exist in the file system" not in str(err.value)


# --- S3 ----------------------------------------------------------------------------------------


@pytest.mark.skipif(moto_executable() is None, reason="moto_server is not installed (make servers: .venv-servers with moto[server])")
@pytest.mark.parametrize("endpoint_var", ["AWS_S3_ENDPOINT", "AWS_ENDPOINT_URL"])
def test_chunk_from_s3_equals_local(region, local_stack, monkeypatch, endpoint_var):
    root, profile, chunk, items = region
    with moto_server() as s3:
        bucket = f"rtsmap-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(bucket)
        for path in root.rglob("*.tif"):
            s3.upload(bucket, path.relative_to(root).as_posix(), path)
        for key, value in s3.gdal_env().items():
            monkeypatch.setenv(key, value)
        # as an AWS CLI / boto3 user sets it (a URL), or as GDAL users do (host:port)
        monkeypatch.delenv("AWS_S3_ENDPOINT" if endpoint_var == "AWS_ENDPOINT_URL" else "AWS_ENDPOINT_URL")
        for key in ("AWS_HTTPS", "AWS_VIRTUAL_HOSTING"):
            if endpoint_var == "AWS_ENDPOINT_URL":
                monkeypatch.delenv(key)  # derived from the URL
        remote = load_chunk(chunk, rehref(items, root, f"s3://{bucket}"), profile.modalities, YEAR)
    assert_same(local_stack, remote)


def test_aws_endpoint_url_becomes_gdal_options(monkeypatch):
    for key in ("AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_VIRTUAL_HOSTING", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    options = gdal_options()
    assert options["AWS_S3_ENDPOINT"] == "127.0.0.1:9000"
    assert options["AWS_HTTPS"] == "NO" and options["AWS_VIRTUAL_HOSTING"] == "FALSE"
    monkeypatch.setenv("AWS_HTTPS", "YES")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "9")
    options = gdal_options()
    assert "AWS_HTTPS" not in options and "GDAL_HTTP_MAX_RETRY" not in options  # the environment wins


# --- signing (Planetary Computer) ------------------------------------------------------------


class _SasHandler(http.server.BaseHTTPRequestHandler):
    """The SAS token endpoint: ``GET /{account}/{container}`` -> ``{"token", "msft:expiry"}``."""

    requests: list[str]
    nonce: str

    def do_GET(self):
        type(self).requests.append(self.path)
        if self.path.endswith("/missing"):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        n = len(type(self).requests)
        token = f"st=2030-01-01T00%3A00%3A00Z&se=2030-01-02T00%3A00%3A00Z&sp=rl&sv=2021-06-08&sr=c&sig=TOKEN{type(self).nonce}x{n}"
        body = json.dumps({"msft:expiry": "2030-01-02T00:00:00Z", "token": token}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def sas_endpoint(monkeypatch):
    """A local SAS token endpoint, set as the package's ``PC_SDK_SAS_URL`` (its caches cleared)."""
    from planetary_computer import sas, settings

    handler = type("Sas", (_SasHandler,), {"requests": [], "nonce": uuid.uuid4().hex[:8]})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("PC_SDK_SAS_URL", f"http://127.0.0.1:{server.server_address[1]}/api/sas/v1/token")
    monkeypatch.delenv("PC_SDK_SUBSCRIPTION_KEY", raising=False)
    settings.Settings.get.cache_clear()
    sas.TOKEN_CACHE.clear()
    yield handler
    server.shutdown()
    server.server_close()
    settings.Settings.get.cache_clear()
    sas.TOKEN_CACHE.clear()


def test_signing_uses_the_token_endpoint_once_per_container(sas_endpoint, caplog):
    caplog.set_level(logging.DEBUG)
    sign = make_signer(CatalogProfile(name="pc", url=None, modalities={}, signing="planetary-computer"))
    href = f"https://{BLOB_HOST}/sentinel2-l2/10/X/B02.tif"
    signed = sign(href, "sentinel-2-l2a")
    assert signed.startswith(href + "?") and f"sig=TOKEN{sas_endpoint.nonce}x1" in signed
    assert f"sig=TOKEN{sas_endpoint.nonce}x1" in sign(href.replace("B02", "B03"), "sentinel-2-l2a")
    assert sign(signed, "sentinel-2-l2a") == signed  # already signed
    assert sas_endpoint.requests == ["/api/sas/v1/token/rtsmapdemo/sentinel2-l2"]  # cached
    sign(f"https://{BLOB_HOST}/sentinel1-grd/a.tif", "sentinel-1-rtc")
    assert len(sas_endpoint.requests) == 2
    assert sign("https://example.org/a.tif", "x") == "https://example.org/a.tif"
    fresh = sign.resign(signed, "sentinel-2-l2a")  # bypasses the cache
    assert f"sig=TOKEN{sas_endpoint.nonce}x3" in fresh and fresh.count("sig=") == 1
    assert strip_sas(fresh) == href
    assert "TOKEN" not in caplog.text


def test_signing_failures_and_schemes_are_clean(sas_endpoint):
    sign = make_signer("planetary-computer")
    with pytest.raises(CatalogError, match="SAS token") as err:
        sign(f"https://{BLOB_HOST}/missing/a.tif?x=1", "c")
    assert "TOKEN" not in str(err.value) and "127.0.0.1" in str(err.value)
    href = f"https://{BLOB_HOST}/c/a.tif"
    assert make_signer(CatalogProfile(name="x", url=None, modalities={}))(href, "c") == href
    with pytest.raises(ConfigError, match="unknown signing scheme"):
        make_signer("aws-sigv4")


@needs_nginx
def test_expired_token_is_renewed_once_and_the_read_retried(region, local_stack, proxy, sas_endpoint, fast_retries, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    root, profile, chunk, items = region
    # GDAL reaches the "blob storage" host through the proxy, which forwards to nginx.
    monkeypatch.setenv("GDAL_HTTP_PROXY", proxy.url.removeprefix("http://"))
    sar = rehref(items, root, f"http://{BLOB_HOST}/{CONTAINER}")["sar"]
    sign = make_signer("planetary-computer")
    sign(sar[0].assets["vv"].href, sar[0].collection_id)  # token 1 is cached ...
    proxy.reject_query(f"sig=TOKEN{sas_endpoint.nonce}x1", 403)  # ... and has expired at the server
    remote = load_chunk(chunk, {"sar": sar}, profile.modalities, YEAR, sign=sign)
    assert_same(local_stack, remote, ["sar"])
    assert len(sas_endpoint.requests) == 2  # one renewal
    refused = [r for r in proxy.requests if r.status == 403]
    assert refused and all(f"TOKEN{sas_endpoint.nonce}x1" in r.path for r in refused)
    assert any(r.status in (200, 206) and f"TOKEN{sas_endpoint.nonce}x2" in r.path for r in proxy.requests)
    assert "TOKEN" not in caplog.text

    # A token the server keeps refusing: re-signed once, then a clean error naming the status.
    proxy.clear()
    proxy.reject_query("sig=TOKEN", 403)
    sar = rehref(items, root, f"http://{BLOB_HOST}/{CONTAINER}", "?v=2")["sar"]
    with pytest.raises(AssetError, match="HTTP response code: 403") as err:
        load_chunk(chunk, {"sar": sar}, profile.modalities, YEAR, sign=sign)
    assert len(sas_endpoint.requests) == 3
    assert "TOKEN" not in str(err.value) and "TOKEN" not in caplog.text
    assert "signing" in str(err.value)


@needs_nginx
def test_expired_token_in_a_group_read_is_renewed_and_read_item_by_item(region, local_stack, proxy, sas_endpoint, fast_retries, monkeypatch, caplog):
    """Several items in one odc-stac call: the 403 fails the group, the items are read again one
    at a time, and the first one re-signs (GDAL's cached failure still names the 403)."""
    import rtsmap.pipeline.load as load_module

    caplog.set_level(logging.DEBUG)
    root, profile, chunk, items = region
    monkeypatch.setattr(load_module, "FIRST_GROUP_ITEMS", 8)
    monkeypatch.setattr(load_module, "LOAD_GROUP_BYTES", 2**31)
    monkeypatch.setenv("GDAL_HTTP_PROXY", proxy.url.removeprefix("http://"))
    optical = rehref(items, root, f"http://{BLOB_HOST}/{CONTAINER}", "?v=group")["optical"]
    assert len(optical) >= 2 and len(local_stack.item_ids["optical"]) >= 2  # a real group
    sign = make_signer("planetary-computer")
    sign(optical[0].assets["red"].href, optical[0].collection_id)  # token 1 is cached ...
    proxy.reject_query(f"sig=TOKEN{sas_endpoint.nonce}x1", 403)  # ... and has expired at the server
    remote = load_chunk(chunk, {"optical": optical}, profile.modalities, YEAR, sign=sign)
    assert_same(local_stack, remote, ["optical"])
    assert len(sas_endpoint.requests) == 2  # one renewal
    assert any(r.status == 403 for r in proxy.requests)
    assert "items in one call failed" in caplog.text and "403" in caplog.text
    assert "TOKEN" not in caplog.text
