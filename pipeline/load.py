"""Load co-registered multimodal stacks for one chunk and year.

Every modality is put on the chunk's read-window grid (``chunk.transform``, ``chunk.shape``, the
grid CRS) by odc-stac: one ``odc.stac.load`` call per STAC item onto an ``odc.geo`` GeoBox, with
the resampling of each band (bilinear for continuous bands, nearest for classes and masks).
odc-stac reads only the part of each COG the window needs (GDAL range reads for http/s3 hrefs,
never whole downloads) and picks overviews where the source is finer.

Why the mosaic is not odc-stac's own ``groupby``/``fuse_func``: a fuser sees one band of one item
at a time, so it cannot drop an optical pixel because the *same item's* SCL says cloud there, and
loading all items of a group at once would hold every item in memory. So each item is loaded
alone, best-first (least cloudy, then closest to the middle of the season), and a pixel is taken
from it only where all its bands are valid, its mask class is not invalid, and no better item gave
that pixel yet. At most one item's bands (plus the output) are in memory at a time; loading stops
as soon as every pixel is filled.

The DEM is read on the read window grown by :data:`DEM_BUFFER_PX` pixels on each side; slope,
hillshade and relative elevation (``pipeline.terrain``) are computed there and cropped, so
adjacent chunks get the same values on their overlap.

Invalid pixels are 0 in ``data`` and False in ``valid``.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import odc.stac
import pystac
import rasterio
import rasterio.errors
from affine import Affine
from odc.geo.geobox import GeoBox

from rtsmap.pipeline import terrain
from rtsmap.pipeline.errors import AssetError, ConfigError
from rtsmap.pipeline.profiles import BandSpec, ModalityProfile, band_scale_offset
from rtsmap.pipeline.stac import _RedactFilter, redact, redact_text

log = logging.getLogger(__name__)
# odc-loader logs the full asset URL (signed query string included) when a read fails.
logging.getLogger("odc.loader._rio").addFilter(_RedactFilter())

#: Pixels added on each side of the read window when reading elevation for terrain derivatives.
DEM_BUFFER_PX = 32

#: GDAL settings for cloud-hosted COGs: no directory listings or side-car probing, range reads
#: only for GeoTIFFs, retries on transient HTTP errors, merged ranges per request.
GDAL_OPTIONS: dict[str, str] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_TIMEOUT": "60",
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_VERSION": "2",
    "VSI_CACHE": "TRUE",
}

_COG_MEDIA_TYPE = "image/tiff; application=geotiff"
# Errors that mean "this asset cannot be read" (missing, corrupt, unreachable, not a raster).
_READ_ERRORS = (rasterio.errors.RasterioError, OSError, ValueError, KeyError, RuntimeError)


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

    Returns
    -------
    ChunkStack
        Modalities with no items are absent.

    Raises
    ------
    AssetError
        An asset is missing, unreadable or corrupt (names the item id and asset key).
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
    with rasterio.Env(**GDAL_OPTIONS):
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
                data, valid, used = _load_terrain(geobox, ordered, profile)
            else:
                data, valid, used = _load_bands(geobox, ordered, profile)
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


def _asset_error(item: pystac.Item, asset: str, reason: str) -> AssetError:
    href = item.assets[asset].href if asset in item.assets else "(none)"
    return AssetError(
        f"cannot read asset '{asset}' of item '{item.id}' ({redact(href)}): "
        f"{redact_text(reason)}; check that the file exists and is a valid GeoTIFF/COG "
        "(this chunk is marked failed, the run goes on)"
    )


def _read_item(
    item: pystac.Item, assets: Mapping[str, tuple[str, float | None]], geobox: GeoBox
) -> dict[str, np.ndarray]:
    """Read the given assets of one item onto ``geobox``.

    Parameters
    ----------
    item : pystac.Item
    assets : dict
        asset key -> (resampling, nodata).
    geobox : GeoBox
        Output grid.

    Returns
    -------
    dict[str, np.ndarray]
        asset key -> float32 ``[H, W]``, NaN outside the item and where the source is nodata.
    """
    for key in assets:
        if key not in item.assets:
            raise _asset_error(item, key, f"the item has no asset '{key}' (it has {sorted(item.assets)})")
    # A minimal copy with only the assets asked for: odc-stac then parses nothing else, and
    # assets without a media type whose href ends in a query string are still seen as rasters.
    slim = pystac.Item(
        id=item.id,
        geometry=item.geometry,
        bbox=item.bbox,
        datetime=item.datetime,
        properties=dict(item.properties),
        collection=item.collection_id,
    )
    for key in assets:
        asset = item.assets[key].clone()
        asset.media_type = asset.media_type or _COG_MEDIA_TYPE
        slim.add_asset(key, asset)
    # Read everything as float32 with the profile's nodata: bilinear output keeps fractions
    # and "outside the item" becomes NaN, which the caller treats as invalid.
    # (nodata None: the item's raster:bands or the file's own nodata is used.)
    asset_cfg: dict[str, dict[str, Any]] = {}
    for key, (_, nodata) in assets.items():
        asset_cfg[key] = {"data_type": "float32"} if nodata is None else {"data_type": "float32", "nodata": nodata}
    stac_cfg = {"*": {"assets": asset_cfg}}
    if item.collection_id:
        stac_cfg[item.collection_id] = {"assets": asset_cfg}

    def load(keys: list[str]) -> Any:
        return odc.stac.load(
            [slim],
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
        # Find the asset at fault so the message can name it (error path only).
        for key in assets:
            try:
                load([key])
            except _READ_ERRORS as single:
                raise _asset_error(item, key, str(single) or type(single).__name__) from None
        raise _asset_error(item, ",".join(assets), str(exc) or type(exc).__name__) from None

    out = {}
    for key, (_, nodata) in assets.items():
        values = ds[key].values[0]
        if nodata is not None and not math.isnan(nodata):
            values[values == nodata] = np.nan
        out[key] = values
    return out


def _physical(values: np.ndarray, band: BandSpec, scale: float, offset: float) -> np.ndarray:
    """Raw values -> physical: ``raw * scale + offset``, then the band's ``transform`` (dB)."""
    if scale != 1.0:
        values = values * np.float32(scale)
    if offset != 0.0:
        values = values + np.float32(offset)
    if band.transform == "db":
        # linear power -> decibels; zero or negative power has no dB value and is invalid
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(values > 0, 10.0 * np.log10(values), np.nan)
    return values.astype(np.float32, copy=False)


def _mosaic(
    geobox: GeoBox, ordered: list[pystac.Item], profile: ModalityProfile
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Best-first, mask-aware mosaic of the profile's bands over ``ordered`` items on ``geobox``.

    Returns float32 ``[C, H, W]`` physical values (NaN where no item was valid), the filled mask
    and the ids of the items that gave pixels.
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
    out = np.full((len(bands), *shape), np.nan, dtype=np.float32)
    filled = np.zeros(shape, dtype=bool)
    used: list[str] = []
    for item in ordered:
        if filled.all():
            break
        layers = _read_item(item, assets, geobox)
        ok = ~filled
        values = []
        for band in bands:
            scale, offset = band_scale_offset(
                profile, band, item.properties, item.assets[band.asset].to_dict()
            )
            v = _physical(layers[band.asset], band, scale, offset)
            ok &= np.isfinite(v)
            values.append(v)
        if mask is not None:
            classes = layers[mask.asset]
            ok &= np.isfinite(classes) & ~np.isin(classes, mask.invalid)
        del layers
        if not ok.any():
            continue
        for c, v in enumerate(values):
            out[c][ok] = v[ok]
        filled |= ok
        used.append(item.id)
    return out, filled, used


def _load_bands(
    geobox: GeoBox, ordered: list[pystac.Item], profile: ModalityProfile
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Directly read bands (optical, SAR): mosaic on the read window itself."""
    data, valid, used = _mosaic(geobox, ordered, profile)
    data[:, ~valid] = 0.0
    return data, valid, used


def _load_terrain(
    geobox: GeoBox, ordered: list[pystac.Item], profile: ModalityProfile
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
    elevation, _, used = _mosaic(buffered, ordered, profile)
    derived = terrain.terrain_derivatives(elevation[0], resolution)
    del elevation
    crop = (slice(buffer, buffer + height), slice(buffer, buffer + width))
    data = np.stack([derived[name][crop] for name in profile.derived]).astype(np.float32)
    valid = np.isfinite(data).all(axis=0)
    data[:, ~valid] = 0.0
    return data, valid, used
