"""Load co-registered multimodal stacks for one chunk and year.

Every modality is put on the chunk's read-window grid (``chunk.transform``, ``chunk.shape``, the
grid CRS) by odc-stac: one ``odc.stac.load`` call per STAC item onto an ``odc.geo`` GeoBox, with
the resampling of each band (bilinear for continuous bands, nearest for classes and masks).
odc-stac reads only the part of each COG the window needs (GDAL range reads for http/s3 hrefs,
never whole downloads) and picks overviews where the source is finer.

Why the mosaic is not odc-stac's own ``groupby``/``fuse_func``: a fuser sees one band of one item
at a time, so it cannot drop an optical pixel because the *same item's* SCL says cloud there, and
fusing all items at once would hold every item in memory. So the items are mosaicked one at a
time, best-first (least cloudy, then closest to the middle of the season), and a pixel is taken
from an item only where all its bands are valid, its mask class is not invalid, and no better item
gave that pixel yet; loading stops as soon as every pixel is filled.

Items are read in groups, several per ``odc.stac.load`` call (``groupby="id"``: one time slice
per item, so the mosaic still sees each item alone), because a call's set-up (parsing, planning,
building the xarray Dataset) costs about as much for one item as for several. The first call of
a modality reads :data:`FIRST_GROUP_ITEMS` item, each later one twice as many as the one before
(the best item often fills the chunk alone, and a group reads items the mosaic may not need), up
to what :data:`LOAD_GROUP_BYTES` allows: a group's float32 layers are at most that many bytes
(or one item's, if one item alone is more). Items whose declared raster metadata differ are not
grouped (odc-stac takes a collection's band metadata from its first item). When a group's read
fails, its items are read again one at a time, so the error names the item and asset and an
HTTP 403 is re-signed per item as before.

The DEM is read on the read window grown by :data:`DEM_BUFFER_PX` pixels on each side; slope,
hillshade and relative elevation (``pipeline.terrain``) are computed there and cropped, so
adjacent chunks get the same values on their overlap.

Invalid pixels are 0 in ``data`` and False in ``valid``.

Remote hrefs: ``http(s)://`` is read through GDAL's ``/vsicurl/`` and ``s3://`` through
``/vsis3/`` (endpoint and credentials from the environment, as AWS users set them:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_S3_ENDPOINT``, ``AWS_HTTPS``,
``AWS_VIRTUAL_HOSTING``). :data:`GDAL_OPTIONS` are the defaults for cloud reads; any of them set in
the environment wins. Hrefs are signed (``sign``) just before each item is read; a read refused
with HTTP 403 (a SAS token that expired since signing) is signed again with a fresh token and
retried once. A read that still fails raises :class:`AssetError` with GDAL's own cause (the HTTP
status or the network error), never with a token.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

import numpy as np
import odc.stac
import pystac
import rasterio
import rasterio.crs
import rasterio.errors
from affine import Affine
from odc.geo.geobox import GeoBox

from rtsmap.pipeline import terrain
from rtsmap.pipeline.errors import AssetError, ConfigError
from rtsmap.pipeline.profiles import BandSpec, ModalityProfile, band_scale_offset
from rtsmap.pipeline.stac import _RedactFilter, redact, redact_text

log = logging.getLogger(__name__)
# odc-loader logs the full asset URL (signed query string included) when a read fails,
# rasterio passes on GDAL's messages ("HTTP error code: 503 - <url>. Retrying ...") with the URL,
# and logs each dataset it opens at DEBUG, URL included.
for _name in ("odc.loader._rio", "rasterio._env", "rasterio._base"):
    logging.getLogger(_name).addFilter(_RedactFilter())

#: Pixels added on each side of the read window when reading elevation for terrain derivatives.
DEM_BUFFER_PX = 32

#: Bound on the float32 layers of one grouped ``odc.stac.load`` call (items x assets x H x W x 4
#: bytes; one item is read alone if it is larger). A call's set-up (~20 ms) is paid once per
#: group, but its reads and nodata fills grow with the pixels, so grouping pays where items are
#: small: measured with benchmarks/bench_load.py, 10 optical items on 480 px windows took 0.98 s
#: grouped vs 1.20 s one by one, on 1824 px windows no faster grouped and 200 MB more. With
#: this bound, 1824 px windows read optical items (5 assets, 66.5 MB) one by one and SAR items
#: (2 assets, 26.6 MB) two at a time; 480 px windows up to 14 optical items at a time.
LOAD_GROUP_BYTES = 64 * 2**20

#: Items read by a modality's first ``odc.stac.load`` call; each later call reads twice as many.
FIRST_GROUP_ITEMS = 1

#: GDAL settings for cloud-hosted COGs (defaults: a variable set in the environment wins): no
#: directory listings or side-car probing, range reads only for GeoTIFF URLs, retries on
#: throttling and server errors (GDAL waits RETRY_DELAY seconds, then about twice as long each
#: time, and also retries timeouts and reset connections), merged ranges per request, HTTP/2
#: where the server offers it over TLS (requests to one host are multiplexed on one connection;
#: plain http stays HTTP/1.1).
GDAL_OPTIONS: dict[str, str] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_RETRY_CODES": "429,500,502,503,504",
    "GDAL_HTTP_TIMEOUT": "60",
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_VERSION": "2TLS",
    "VSI_CACHE": "TRUE",
}

#: An href signer: ``(href, collection) -> href`` (see :func:`rtsmap.pipeline.signing.make_signer`).
Signer = Callable[[str, str], str]

_COG_MEDIA_TYPE = "image/tiff; application=geotiff"
# Errors that mean "this asset cannot be read" (missing, corrupt, unreachable, not a raster).
_READ_ERRORS = (rasterio.errors.RasterioError, OSError, ValueError, KeyError, RuntimeError)
# GDAL's wording of an HTTP failure: "HTTP response code: 403", "HTTP error code: 503".
_HTTP_STATUS = re.compile(r"HTTP (?:response|error) code: (\d{3})")
# GDAL caches a failed URL as "does not exist": its first message is the one with the cause.
_GENERIC = "does not exist in the file system"


def gdal_options() -> dict[str, str]:
    """:data:`GDAL_OPTIONS` less those set in the environment (GDAL reads those itself), plus
    the S3 endpoint of ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (the AWS CLI's and boto3's
    names) as GDAL's ``AWS_S3_ENDPOINT``, ``AWS_HTTPS`` and path-style addressing, unless those
    are set.

    Returns
    -------
    dict[str, str]
        Options for ``rasterio.Env``.
    """
    options = {key: value for key, value in GDAL_OPTIONS.items() if key not in os.environ}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "AWS_S3_ENDPOINT" not in os.environ:
        parts = urlsplit(endpoint)
        options["AWS_S3_ENDPOINT"] = (parts.netloc + parts.path).rstrip("/") or endpoint
        options.setdefault("AWS_HTTPS", "NO" if parts.scheme == "http" else "YES")
        # Custom endpoints (MinIO, Ceph, moto, ...) are addressed path-style.
        options.setdefault("AWS_VIRTUAL_HOSTING", "FALSE")
        options = {k: v for k, v in options.items() if k == "AWS_S3_ENDPOINT" or k not in os.environ}
    return options


@dataclass
class ChunkStack:
    """All modalities of one chunk and year on the chunk's read-window grid."""

    chunk_id: str
    """Id of the chunk (``Chunk.id``)."""
    year: int
    """Year the optical and SAR scenes were chosen for."""
    transform: Affine
    """Affine transform of the read window (grid CRS)."""
    crs: str
    """Grid CRS, e.g. ``"EPSG:3413"``."""
    shape: tuple[int, int]
    """``(H, W)`` of the read window."""
    data: dict[str, np.ndarray]
    """Per modality, float32 ``[C, H, W]`` in the order of ``band_names``; 0 where invalid."""
    valid: dict[str, np.ndarray]
    """Per modality, bool ``[H, W]``: True where some item gave a valid value for every band."""
    item_ids: dict[str, list[str]]
    """Per modality, ids of the items that gave at least one pixel, best first."""
    band_names: dict[str, tuple[str, ...]]
    """Per modality, the band names of ``data`` (``ModalityProfile.band_names``)."""


def load_chunk(
    chunk: Any,
    items: Mapping[str, list[pystac.Item]],
    profiles: Mapping[str, ModalityProfile],
    year: int,
    *,
    sign: Signer | None = None,
) -> ChunkStack:
    """Load every modality of one chunk and year onto the chunk's read-window grid.

    Parameters
    ----------
    chunk : pipeline.grid.Chunk
        The chunk; ``transform``, ``shape`` and ``spec.crs`` define the output grid.
    items : dict[str, list[pystac.Item]]
        Candidate items per modality (any order; they are sorted best-first here).
    profiles : dict[str, pipeline.profiles.ModalityProfile]
        How to read each modality (bands, mask, season, cloud property).
    year : int
        The year whose season the optical/SAR items are ranked against.
    sign : callable, optional
        ``(href, collection) -> href``, called on each href just before it is read (from
        :func:`rtsmap.pipeline.signing.make_signer`). When it has a ``resign`` method, a read
        refused with HTTP 403 is signed again with a fresh token and retried once.

    Returns
    -------
    ChunkStack
        Modalities with no items are absent.

    Raises
    ------
    AssetError
        An asset is missing, unreadable or corrupt, or the server or network failed after
        GDAL's retries (names the item id, the asset key and the cause, e.g. the HTTP status).
    CatalogError
        ``sign`` could not get a token.
    ConfigError
        A modality has items but no profile, or its profile cannot be loaded as asked.
    """
    crs = str(chunk.spec.crs)
    geobox = GeoBox(tuple(chunk.shape), chunk.transform, crs)
    stack = ChunkStack(
        chunk_id=chunk.id,
        year=year,
        transform=chunk.transform,
        crs=crs,
        shape=tuple(chunk.shape),
        data={},
        valid={},
        item_ids={},
        band_names={},
    )
    with rasterio.Env(**gdal_options()):
        for modality, modality_items in items.items():
            if not modality_items:
                continue
            if modality not in profiles:
                raise ConfigError(
                    f"no modality profile for '{modality}' (profiles: {sorted(profiles)}); "
                    "add it to the profile file or drop its items"
                )
            profile = profiles[modality]
            ordered = order_items(modality_items, profile, year)
            if profile.derived:
                data, valid, used = _load_terrain(geobox, ordered, profile, sign)
            else:
                data, valid, used = _load_bands(geobox, ordered, profile, sign)
            stack.data[modality] = data
            stack.valid[modality] = valid
            stack.item_ids[modality] = used
            stack.band_names[modality] = tuple(profile.band_names)
    return stack


# --- ordering ---------------------------------------------------------------------------


def season_peak(season: Any, year: int) -> dt.date | None:
    """Middle of a profile's season window in ``year`` (None when there is no season).

    Parameters
    ----------
    season : str or tuple or None
        ``"MM-DD..MM-DD"``, a pair of ``"MM-DD"`` strings or dates, or an object with
        ``start``/``end`` attributes holding either.
    year : int
        Year to place the window in.

    Returns
    -------
    datetime.date or None
    """
    if season is None:
        return None
    if isinstance(season, str):
        start, end = season.split("..")
    elif hasattr(season, "start") and hasattr(season, "end"):
        start, end = season.start, season.end
    else:
        start, end = season

    def as_date(value: Any) -> dt.date:
        if isinstance(value, dt.date):
            return dt.date(year, value.month, value.day)
        month, day = str(value).split("-")[-2:]
        return dt.date(year, int(month), int(day))

    first, last = as_date(start), as_date(end)
    if last < first:  # a season over new year, e.g. 12-01..02-28
        last = dt.date(year + 1, last.month, last.day)
    return first + (last - first) / 2


def order_items(items: Iterable[pystac.Item], profile: ModalityProfile, year: int) -> list[pystac.Item]:
    """Sort items best-first: cloud cover ascending, then days from the season's middle, then id.

    Parameters
    ----------
    items : iterable of pystac.Item
    profile : ModalityProfile
        Uses ``cloud_property`` (items without it rank after those with it) and ``season``.
    year : int

    Returns
    -------
    list[pystac.Item]
    """
    cloud_property = profile.cloud_property
    peak = season_peak(profile.season, year)

    def key(item: pystac.Item) -> tuple[float, float, str]:
        cloud = item.properties.get(cloud_property) if cloud_property else None
        cloud = math.inf if cloud is None else float(cloud)
        when = item.datetime or pystac.utils.str_to_datetime(item.properties["start_datetime"])
        days = abs((when.date() - peak).days) if peak is not None else 0.0
        return (cloud, days, item.id)

    return sorted(items, key=key)


# --- reading -----------------------------------------------------------------------------


def _hint(reason: str) -> str:
    """What to check, given GDAL's cause of a failed read."""
    match = _HTTP_STATUS.search(reason)
    status = int(match.group(1)) if match else None
    if status in (401, 403):
        return "access was refused: check the credentials, or the signing (a token may have expired)"
    if status == 404:
        return "the server has no such file"
    if status is not None:
        return "the server kept failing after GDAL's retries (GDAL_HTTP_MAX_RETRY, GDAL_HTTP_RETRY_DELAY)"
    if "CURL error" in reason or "timed out" in reason:
        return "the network failed after GDAL's retries: check that the host is reachable"
    return "check that the file exists and is a valid GeoTIFF/COG"


def _asset_error(item: pystac.Item, asset: str, reason: str) -> AssetError:
    href = item.assets[asset].href if asset in item.assets else "(none)"
    return AssetError(
        f"cannot read asset '{asset}' of item '{item.id}' ({redact(href)}): "
        f"{redact_text(reason)}; {_hint(reason)} (this chunk is marked failed, the run goes on)"
    )


class _ReadFailure(Exception):
    """An item read failed: the asset at fault and GDAL's cause (internal to this module)."""

    def __init__(self, asset: str, reason: str):
        super().__init__(reason)
        self.asset = asset
        self.reason = reason
        match = _HTTP_STATUS.search(reason)
        self.status = int(match.group(1)) if match else None


def _read_item(
    item: pystac.Item,
    assets: Mapping[str, tuple[str, float | None]],
    geobox: GeoBox,
    sign: Signer | None = None,
    cause: str | None = None,
) -> dict[str, np.ndarray]:
    """Read the given assets of one item onto ``geobox``, signing hrefs first.

    Parameters
    ----------
    item : pystac.Item
    assets : dict
        asset key -> (resampling, nodata).
    geobox : GeoBox
        Output grid.
    sign : callable, optional
        Href signer; with a ``resign`` method, an HTTP 403 is retried once with fresh tokens.
    cause : str, optional
        GDAL's message of a failed group read that held this item: GDAL now says only "does
        not exist" for the URL that failed, so that message stands in for it.

    Returns
    -------
    dict[str, np.ndarray]
        asset key -> float32 ``[H, W]``, NaN outside the item and where the source is nodata.
    """
    for key in assets:
        if key not in item.assets:
            raise _asset_error(item, key, f"the item has no asset '{key}' (it has {sorted(item.assets)})")
    # Signed hrefs live only in this function's copies, for this read.
    hrefs = {key: item.assets[key].href for key in assets}
    if sign is not None:
        hrefs = {key: sign(href, item.collection_id) for key, href in hrefs.items()}
    try:
        (values,) = _read_signed([item], assets, geobox, [hrefs], cause)
        _warn_if_georeferencing_disagrees(item, next(iter(hrefs.values())))
        return values
    except _ReadFailure as failure:
        resign = getattr(sign, "resign", None)
        if failure.status != 403 or resign is None:
            raise _asset_error(item, failure.asset, failure.reason) from None
        log.info("HTTP 403 reading item %s: signing its hrefs again with a fresh token", item.id)
        # resign() gets the refused href, so it renews a token once, not once per asset.
        hrefs = {key: resign(href, item.collection_id) for key, href in hrefs.items()}
        try:
            (values,) = _read_signed([item], assets, geobox, [hrefs])
            return values
        except _ReadFailure as again:
            raise _asset_error(item, again.asset, again.reason) from None


def _read_group(
    items: list[pystac.Item],
    assets: Mapping[str, tuple[str, float | None]],
    geobox: GeoBox,
    sign: Signer | None = None,
) -> tuple[list[dict[str, np.ndarray]] | None, str | None]:
    """Read several items in one ``odc.stac.load`` call (they all have every asset).

    Returns
    -------
    tuple
        Per item, what :func:`_read_item` returns, and None; or, when the read failed, None and
        GDAL's message (the caller reads the items one at a time, which names the item and
        asset at fault and re-signs after an HTTP 403).
    """
    hrefs = [{key: item.assets[key].href for key in assets} for item in items]
    if sign is not None:
        hrefs = [{key: sign(href, item.collection_id) for key, href in h.items()} for item, h in zip(items, hrefs)]
    try:
        values = _read_signed(items, assets, geobox, hrefs)
    except _ReadFailure as failure:
        log.info("reading %d items in one call failed (%s): reading them one at a time",
                 len(items), redact_text(failure.reason))
        return None, failure.reason
    for item, h in zip(items, hrefs):
        _warn_if_georeferencing_disagrees(item, next(iter(h.values())))
    return values, None


def _group_key(item: pystac.Item, assets: Iterable[str]) -> tuple[Any, ...] | None:
    """Items with equal keys may share an ``odc.stac.load`` call; None: read it alone.

    odc-stac takes a collection's band metadata (nodata, data type) from the first item it
    parses, so items that declare different raster metadata for an asset are read apart, as
    one call each would read them; an item lacking an asset is read alone, where
    :func:`_read_item` raises for it at its turn in the mosaic.
    """
    if any(key not in item.assets for key in assets):
        return None
    declared = tuple(repr(item.assets[key].extra_fields.get("raster:bands")) for key in assets)
    return (item.collection_id, declared)


def _groups(
    ordered: list[pystac.Item], assets: Mapping[str, Any], shape: tuple[int, int]
) -> Iterable[list[pystac.Item]]:
    """Consecutive runs of ``ordered`` for one ``odc.stac.load`` call each (see the module
    docstring: sizes 1, 2, 4, ... from :data:`FIRST_GROUP_ITEMS`, bounded by
    :data:`LOAD_GROUP_BYTES`)."""
    item_bytes = len(assets) * shape[0] * shape[1] * 4
    limit = max(1, LOAD_GROUP_BYTES // max(1, item_bytes))
    size = max(1, FIRST_GROUP_ITEMS)
    start = 0
    while start < len(ordered):
        key = _group_key(ordered[start], assets)
        end = start + 1
        while key is not None and end < len(ordered) and end - start < min(size, limit):
            if _group_key(ordered[end], assets) != key:
                break
            end += 1
        yield ordered[start:end]
        start = end
        size *= 2


# (item id, declared CRS, href without query) compared in this process: one file open and at
# most one warning per item, not one per chunk, year and read.
_GEOREF_CHECKED: set[tuple[str, str, str]] = set()


def _warn_if_georeferencing_disagrees(item: pystac.Item, href: str) -> None:
    """Warn once per item whose declared ``proj:code``/``proj:epsg`` is not its file's CRS.

    The read itself already trusts the file: odc-stac reprojects from the georeferencing GDAL
    reads in the file, so a wrong declaration only earns this warning (it would mislead any
    tool that plans from the metadata, and often means a broken catalog).
    """
    props = item.properties
    declared = props.get("proj:code") or (f"EPSG:{props['proj:epsg']}" if props.get("proj:epsg") else None)
    if not declared:
        return
    key = (item.id, str(declared), href.split("?")[0])
    if key in _GEOREF_CHECKED:
        return
    _GEOREF_CHECKED.add(key)
    try:
        with rasterio.open(href) as src:  # the header is in GDAL's cache after the read
            actual = src.crs
        if actual is None or rasterio.crs.CRS.from_user_input(declared) == actual:
            return
    except (rasterio.errors.RasterioError, ValueError):
        return  # an unreadable file was reported by the read; an unparsable code is no evidence
    log.warning("item %s declares %s but its file %s is in %s: the file's georeferencing is used",
                item.id, declared, redact(href), actual.to_string())


def _read_signed(
    items: list[pystac.Item],
    assets: Mapping[str, tuple[str, float | None]],
    geobox: GeoBox,
    hrefs: list[Mapping[str, str]],
    cause: str | None = None,
) -> list[dict[str, np.ndarray]]:
    """Read ``items`` in one ``odc.stac.load`` call with the given (signed) href per asset.

    Returns, per item, what :func:`_read_item` returns; raises :class:`_ReadFailure`.
    """
    # Minimal copies with only the assets asked for: odc-stac then parses nothing else, and
    # assets without a media type whose href ends in a query string are still seen as rasters.
    slims = []
    for n, (item, item_hrefs) in enumerate(zip(items, hrefs)):
        slim = pystac.Item(
            # unique ids: groupby="id" keeps one time slice per input item, in input order
            id=item.id if len(items) == 1 else f"{n}:{item.id}",
            geometry=item.geometry,
            bbox=item.bbox,
            datetime=item.datetime,
            properties=dict(item.properties),
            collection=item.collection_id,
        )
        for key in assets:
            asset = item.assets[key].clone()
            asset.media_type = asset.media_type or _COG_MEDIA_TYPE
            asset.href = item_hrefs[key]
            slim.add_asset(key, asset)
        slims.append(slim)
    # Read everything as float32 with the profile's nodata: bilinear output keeps fractions
    # and "outside the item" becomes NaN, which the caller treats as invalid.
    # (nodata None: the item's raster:bands or the file's own nodata is used.)
    asset_cfg: dict[str, dict[str, Any]] = {}
    for key, (_, nodata) in assets.items():
        asset_cfg[key] = {"data_type": "float32"} if nodata is None else {"data_type": "float32", "nodata": nodata}
    stac_cfg = {"*": {"assets": asset_cfg}}
    for item in items:
        if item.collection_id:
            stac_cfg[item.collection_id] = {"assets": asset_cfg}

    def load(keys: list[str]) -> Any:
        return odc.stac.load(
            slims,
            bands=keys,
            geobox=geobox,
            resampling={key: assets[key][0] for key in keys},
            dtype="float32",
            groupby="id",
            stac_cfg=stac_cfg,
            fail_on_error=True,
        )

    try:
        ds = load(list(assets))
    except _READ_ERRORS as exc:
        # The first failure carries GDAL's cause (HTTP status, CURL error); GDAL then caches the
        # URL as missing, so reading it again says only "does not exist in the file system".
        first = str(exc) or type(exc).__name__
        if cause is not None and _GENERIC in first:
            first = cause  # this item's URL failed in a group read first
        if len(items) > 1:
            raise _ReadFailure(",".join(assets), first) from None  # the caller reads one by one
        # Find the asset at fault so the message can name it (error path only).
        for key in assets:
            try:
                load([key])
            except _READ_ERRORS as single:
                text = str(single) or type(single).__name__
                raise _ReadFailure(key, first if _GENERIC in text else text) from None
        raise _ReadFailure(",".join(assets), first) from None

    out = []
    for n in range(len(items)):
        layers = {}
        for key, (_, nodata) in assets.items():
            values = ds[key].values[n]
            if nodata is not None and not math.isnan(nodata):
                values[values == nodata] = np.nan
            layers[key] = values
        out.append(layers)
    return out


def _physical(values: np.ndarray, band: BandSpec, scale: float, offset: float, inplace: bool = False) -> np.ndarray:
    """Raw values -> physical: ``raw * scale + offset``, then the band's ``transform`` (dB).

    ``inplace``: overwrite ``values`` (a float32 layer no other band reads) instead of
    allocating one to three temporaries the size of the chunk; the float32 arithmetic is the
    same either way.
    """
    values = values.astype(np.float32, copy=not inplace)
    if scale != 1.0:
        values *= np.float32(scale)
    if offset != 0.0:
        values += np.float32(offset)
    if band.transform == "db":
        # linear power -> decibels; zero or negative power has no dB value and is invalid
        no_power = values <= 0
        with np.errstate(divide="ignore", invalid="ignore"):
            np.log10(values, out=values)
        values *= np.float32(10.0)
        values[no_power] = np.nan
    return values


def _mosaic(
    geobox: GeoBox,
    ordered: list[pystac.Item],
    profile: ModalityProfile,
    sign: Signer | None = None,
    fill: float = np.nan,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Best-first, mask-aware mosaic of the profile's bands over ``ordered`` items on ``geobox``.

    Returns float32 ``[C, H, W]`` physical values (``fill`` where no item was valid), the filled
    mask and the ids of the items that gave pixels.
    """
    bands = list(profile.bands)
    mask = profile.mask
    assets: dict[str, tuple[str, float | None]] = {}
    for band in bands:
        assets[band.asset] = (band.resampling, band.nodata)
    if mask is not None:
        # class layers are never interpolated
        assets.setdefault(mask.asset, ("nearest", None))

    shape = geobox.shape.yx
    out = np.full((len(bands), *shape), fill, dtype=np.float32)
    filled = np.zeros(shape, dtype=bool)
    used: list[str] = []
    for group in _groups(ordered, assets, shape):
        if filled.all():
            break
        read, cause = _read_group(group, assets, geobox, sign) if len(group) > 1 else (None, None)
        for n, item in enumerate(group):
            if filled.all():
                break
            layers = read[n] if read is not None else _read_item(item, assets, geobox, sign, cause)
            if _add_item(out, filled, layers, item, profile):
                used.append(item.id)
            del layers
        del read
    return out, filled, used


def _add_item(
    out: np.ndarray, filled: np.ndarray, layers: Mapping[str, np.ndarray], item: pystac.Item, profile: ModalityProfile
) -> bool:
    """Write one item's pixels where all its bands are valid, its mask class is not invalid and
    ``filled`` is False; mark them filled. Returns whether it gave any pixel."""
    ok = ~filled
    values = []
    readers = Counter(band.asset for band in profile.bands)
    if profile.mask is not None:
        readers[profile.mask.asset] += 1
    for band in profile.bands:
        scale, offset = band_scale_offset(profile, band, item.properties, item.assets[band.asset].to_dict())
        # the layers are this read's own arrays: a layer only this band reads is converted in place
        v = _physical(layers[band.asset], band, scale, offset, inplace=readers[band.asset] == 1)
        ok &= np.isfinite(v)
        values.append(v)
    mask = profile.mask
    if mask is not None:
        classes = layers[mask.asset]
        ok &= np.isfinite(classes)
        # one comparison per invalid class: faster than np.isin for the few classes a mask has
        for value in mask.invalid:
            ok &= classes != value
    if not ok.any():
        return False
    for c, v in enumerate(values):
        np.copyto(out[c], v, where=ok)
    filled |= ok
    return True


def _load_bands(
    geobox: GeoBox, ordered: list[pystac.Item], profile: ModalityProfile, sign: Signer | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Directly read bands (optical, SAR): mosaic on the read window itself."""
    # invalid pixels are 0 (the mosaic's fill), valid ones what the items gave
    return _mosaic(geobox, ordered, profile, sign, fill=0.0)


def _load_terrain(
    geobox: GeoBox, ordered: list[pystac.Item], profile: ModalityProfile, sign: Signer | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """DEM derivatives: mosaic elevation on a buffered window, derive, crop."""
    if len(profile.bands) != 1:
        raise ConfigError(
            f"profile '{profile.name}': derived layers {list(profile.derived)} need exactly one "
            f"elevation band, not {[b.name for b in profile.bands]}"
        )
    resolution = abs(geobox.affine.a)
    buffer = max(DEM_BUFFER_PX, terrain.required_buffer_px(resolution) + 1)
    height, width = geobox.shape.yx
    buffered = GeoBox(
        (height + 2 * buffer, width + 2 * buffer),
        geobox.affine @ Affine.translation(-buffer, -buffer),
        geobox.crs,
    )
    elevation, _, used = _mosaic(buffered, ordered, profile, sign)
    derived = terrain.terrain_derivatives(elevation[0], resolution)
    del elevation
    crop = (slice(buffer, buffer + height), slice(buffer, buffer + width))
    data = np.stack([derived[name][crop] for name in profile.derived]).astype(np.float32)
    valid = np.isfinite(data).all(axis=0)
    np.copyto(data, np.float32(0.0), where=~valid)
    return data, valid, used
