"""Modality profiles: where each modality lives in a catalog and how to read it.

A profile is a YAML file (the ones shipped live in ``workflows/profiles/``) read into frozen
dataclasses. This module only takes paths; turning a short name such as ``earth-search`` into a
path is the workflows' job (pipeline never imports workflows).

YAML layout::

    name: earth-search
    url: https://earth-search.aws.element84.com/v1     # null for local catalogs
    signing: null                                      # or planetary-computer
    headers: {}                                        # extra HTTP headers for the API
    modalities:
      optical:
        collections: [sentinel-2-l2a]
        per_year: true
        season: ["07-01", "08-31"]
        cloud_property: eo:cloud_cover
        max_cloud: 40
        bands:
          - {name: blue, asset: blue, nodata: 0, scale: 0.0001, dtype: uint16}
        mask: {asset: scl, invalid: [0, 1, 3, 8, 9, 10]}

Unknown keys and wrong types are refused with a :class:`~pipeline.errors.ConfigError` that
names the key and the file, because a typo in a profile (``max_clouds``) would otherwise be
ignored silently and change the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rtsmap.pipeline.errors import ConfigError

RESAMPLING = ("nearest", "bilinear", "cubic", "average", "mode", "min", "max", "med")
KINDS = ("continuous", "class")
TRANSFORMS = ("db",)
SIGNINGS = ("planetary-computer",)
DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")
DERIVED = ("slope", "hillshade", "relative_elevation")

_MONTH_DAY = re.compile(r"^(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$")


@dataclass(frozen=True)
class BandSpec:
    """One band of a modality, read from one STAC asset."""

    name: str
    """Model-facing band name (``blue``, ``vv``, ``elevation``...)."""
    asset: str
    """STAC asset key that holds the band."""
    resampling: str = "bilinear"
    """Resampling used to bring the asset onto the grid (rasterio/GDAL name)."""
    nodata: float | None = None
    """Raw value that marks missing pixels; None means the file's own nodata (or none)."""
    scale: float = 1.0
    """Physical value = raw * scale + offset (before ``transform``)."""
    offset: float = 0.0
    """See ``scale``."""
    kind: str = "continuous"
    """``continuous`` (interpolate) or ``class`` (categorical: nearest only)."""
    transform: str | None = None
    """Applied after scale/offset: None, or ``db`` (10 * log10(value); linear power -> dB)."""
    dtype: str = "float32"
    """Data type of the stored raster; used for input size estimates."""


@dataclass(frozen=True)
class MaskSpec:
    """A class layer (e.g. Sentinel-2 SCL) whose listed values make a pixel invalid."""

    asset: str
    """STAC asset key of the class layer."""
    invalid: tuple[int, ...]
    """Class values that are invalid (no data, cloud, shadow...)."""
    dtype: str = "uint8"
    """Data type of the stored class layer; used for input size estimates."""


@dataclass(frozen=True)
class OffsetRule:
    """An offset that applies only to items whose property is at least some value.

    Sentinel-2 L2A from processing baseline 04.00 (January 2022) stores reflectance with a
    +1000 DN offset, so reflectance = DN * 0.0001 - 0.1 there, and DN * 0.0001 before.
    """

    property: str
    """Item property compared, e.g. ``s2:processing_baseline``."""
    min_value: str
    """The rule applies when the property (compared as version numbers) is >= this."""
    offset: float
    """Offset used instead of the band's own offset when the rule applies."""


@dataclass(frozen=True)
class ModalityProfile:
    """Where a modality (optical, sar, dem) lives and how to read it."""

    name: str
    """Modality name: ``optical``, ``sar`` or ``dem``."""
    collections: tuple[str, ...]
    """STAC collection ids searched for this modality."""
    bands: tuple[BandSpec, ...]
    """Bands read from the items, in order."""
    mask: MaskSpec | None = None
    """Optional class layer marking invalid pixels."""
    per_year: bool = True
    """True: searched once per year in ``season``; False (DEM): searched once, no date filter."""
    season: tuple[str, str] | None = None
    """Month-day window ("MM-DD", "MM-DD") searched each year, both days included."""
    cloud_property: str | None = None
    """Item property holding the cloud cover percentage, e.g. ``eo:cloud_cover``."""
    max_cloud: float | None = None
    """Items with more cloud than this (percent) are left out; None keeps all."""
    derived: tuple[str, ...] = ()
    """Model-facing layers derived from the bands (DEM: slope, hillshade, relative_elevation)."""
    offset_rule: OffsetRule | None = None
    """Per-item offset override (Sentinel-2 processing baseline >= 04.00)."""
    use_item_scale: bool = True
    """Prefer the scale/offset an item's asset declares in ``raster:bands`` when present."""

    @property
    def band_names(self) -> tuple[str, ...]:
        """Names of the layers given to the model: the derived ones if any, else the bands."""
        return self.derived or tuple(b.name for b in self.bands)


@dataclass(frozen=True)
class CatalogProfile:
    """A catalog (STAC API or local) and the modalities found in it."""

    name: str
    """Short name, e.g. ``earth-search``."""
    url: str | None
    """STAC API root URL; None for a local catalog given on the command line."""
    modalities: dict[str, ModalityProfile]
    """Modality name -> profile, in file order."""
    signing: str | None = None
    """None, or ``planetary-computer`` (asset hrefs need a SAS token at read time)."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra HTTP headers sent to the API."""
    source: str | None = None
    """The YAML file this profile was read from."""


def band_scale_offset(
    modality: ModalityProfile, band: BandSpec, properties: dict[str, Any], asset: dict[str, Any] | None = None
) -> tuple[float, float]:
    """Scale and offset to apply to one band of one item.

    Parameters
    ----------
    modality, band
        The modality profile and the band.
    properties
        The item's properties (for ``offset_rule``).
    asset
        The item's asset dictionary (for ``raster:bands``), if any.

    Returns
    -------
    tuple of float
        ``(scale, offset)``: physical value = raw * scale + offset.
    """
    # An item that states its own scale/offset (Earth Search v1 does, in raster:bands) knows its
    # processing baseline better than any rule of ours.
    if modality.use_item_scale and asset:
        raster_bands = asset.get("raster:bands") or []
        if raster_bands and isinstance(raster_bands[0], dict):
            rb = raster_bands[0]
            if "scale" in rb or "offset" in rb:
                return float(rb.get("scale", 1.0)), float(rb.get("offset", 0.0))
    rule = modality.offset_rule
    if rule is not None and rule.property in properties:
        if _version_key(str(properties[rule.property])) >= _version_key(rule.min_value):
            return band.scale, rule.offset
    return band.scale, band.offset


def _version_key(value: str) -> tuple[int, ...]:
    """``"04.00"`` -> ``(4, 0)`` so that ``"10.00" > "04.00"``; non-numbers sort first."""
    parts = []
    for part in re.split(r"[.\-_]", value.strip()):
        parts.append(int(part) if part.isdigit() else -1)
    return tuple(parts)


# --- reading YAML ---------------------------------------------------------------------------


def load_profile(path: str | Path) -> CatalogProfile:
    """Read a catalog profile from a YAML file.

    Parameters
    ----------
    path
        The YAML file.

    Returns
    -------
    CatalogProfile

    Raises
    ------
    ConfigError
        If the file is missing, is not YAML, or has unknown keys, missing keys or wrong types
        (the message names the key and the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"profile {path} does not exist: give a profile name or a YAML file path")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"profile {path} is not valid YAML: {exc}") from None
    where = _Where(path)
    top = _mapping(raw, "profile", where)
    _keys(top, "profile", where, required={"name", "modalities"}, optional={"url", "signing", "headers"})
    name = _typed(top, "name", str, "profile", where)
    url = _typed(top, "url", str, "profile", where, optional=True)
    signing = _typed(top, "signing", str, "profile", where, optional=True)
    if signing is not None and signing not in SIGNINGS:
        raise where.error("signing", f"must be null or one of {list(SIGNINGS)}, not {signing!r}")
    headers = _typed(top, "headers", dict, "profile", where, optional=True) or {}
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise where.error("headers", "must map header names to strings")
    modalities_raw = _mapping(top["modalities"], "modalities", where)
    if not modalities_raw:
        raise where.error("modalities", "must name at least one modality")
    modalities = {
        str(mname): _modality(str(mname), mraw, where) for mname, mraw in modalities_raw.items()
    }
    return CatalogProfile(
        name=name, url=url, modalities=modalities, signing=signing, headers=dict(headers), source=str(path)
    )


class _Where:
    """Names the file in every error message."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"profile {self.path}: key '{key}' {what}")


def _mapping(value: Any, key: str, where: _Where) -> dict:
    if not isinstance(value, dict):
        raise where.error(key, f"must be a mapping, not {type(value).__name__}")
    return value


def _keys(mapping: dict, key: str, where: _Where, *, required: set[str], optional: set[str]) -> None:
    unknown = sorted(str(k) for k in set(mapping) - required - optional)
    if unknown:
        raise where.error(
            f"{key}.{unknown[0]}", f"is unknown (allowed: {', '.join(sorted(required | optional))})"
        )
    missing = sorted(required - set(mapping))
    if missing:
        raise where.error(f"{key}.{missing[0]}", "is missing")


def _typed(mapping: dict, key: str, kind: type | tuple, parent: str, where: _Where, *, optional: bool = False):
    value = mapping.get(key)
    if value is None:
        if optional:
            return None
        raise where.error(f"{parent}.{key}", "is missing")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a profile that says `scale: true` is a mistake.
    if isinstance(value, bool) and bool not in kinds:
        raise where.error(f"{parent}.{key}", f"must be {_kind_names(kinds)}, not a boolean")
    if not isinstance(value, kinds):
        raise where.error(f"{parent}.{key}", f"must be {_kind_names(kinds)}, not {type(value).__name__}")
    return value


def _kind_names(kinds: tuple) -> str:
    names = {str: "a string", int: "a number", float: "a number", bool: "true or false", dict: "a mapping", list: "a list"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _choice(value: str | None, choices: tuple, key: str, where: _Where) -> None:
    if value is not None and value not in choices:
        raise where.error(key, f"must be one of {list(choices)}, not {value!r}")


def _modality(name: str, raw: Any, where: _Where) -> ModalityProfile:
    at = f"modalities.{name}"
    m = _mapping(raw, at, where)
    _keys(
        m,
        at,
        where,
        required={"collections", "bands"},
        optional={"mask", "per_year", "season", "cloud_property", "max_cloud", "derived", "offset_rule", "use_item_scale"},
    )
    collections = _typed(m, "collections", list, at, where)
    if not collections or not all(isinstance(c, str) for c in collections):
        raise where.error(f"{at}.collections", "must be a non-empty list of collection ids")
    bands_raw = _typed(m, "bands", list, at, where)
    if not bands_raw:
        raise where.error(f"{at}.bands", "must list at least one band")
    bands = tuple(_band(b, f"{at}.bands[{i}]", where) for i, b in enumerate(bands_raw))
    per_year = m.get("per_year", True)
    if not isinstance(per_year, bool):
        raise where.error(f"{at}.per_year", "must be true or false")
    season = None
    if m.get("season") is not None:
        season_raw = _typed(m, "season", list, at, where)
        if len(season_raw) != 2 or not all(isinstance(s, str) and _MONTH_DAY.match(s) for s in season_raw):
            raise where.error(f"{at}.season", 'must be two "MM-DD" strings, e.g. ["07-01", "08-31"]')
        if season_raw[0] > season_raw[1]:
            raise where.error(f"{at}.season", "must not wrap around the new year (start after end)")
        season = (season_raw[0], season_raw[1])
    if per_year and season is None:
        raise where.error(f"{at}.season", "is missing (needed when per_year is true)")
    cloud_property = _typed(m, "cloud_property", str, at, where, optional=True)
    max_cloud = _typed(m, "max_cloud", (int, float), at, where, optional=True)
    if max_cloud is not None and not 0 <= max_cloud <= 100:
        raise where.error(f"{at}.max_cloud", "must be a percentage between 0 and 100")
    if max_cloud is not None and cloud_property is None:
        raise where.error(f"{at}.cloud_property", "is missing (needed with max_cloud)")
    derived = tuple(_typed(m, "derived", list, at, where, optional=True) or ())
    for d in derived:
        _choice(d, DERIVED, f"{at}.derived", where)
    mask = None
    if m.get("mask") is not None:
        mraw = _mapping(m["mask"], f"{at}.mask", where)
        _keys(mraw, f"{at}.mask", where, required={"asset", "invalid"}, optional={"dtype"})
        invalid = _typed(mraw, "invalid", list, f"{at}.mask", where)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in invalid):
            raise where.error(f"{at}.mask.invalid", "must be a list of integer class values")
        dtype = _typed(mraw, "dtype", str, f"{at}.mask", where, optional=True) or "uint8"
        _choice(dtype, DTYPES, f"{at}.mask.dtype", where)
        mask = MaskSpec(asset=_typed(mraw, "asset", str, f"{at}.mask", where), invalid=tuple(invalid), dtype=dtype)
    offset_rule = None
    if m.get("offset_rule") is not None:
        oraw = _mapping(m["offset_rule"], f"{at}.offset_rule", where)
        _keys(oraw, f"{at}.offset_rule", where, required={"property", "min_value", "offset"}, optional=set())
        offset_rule = OffsetRule(
            property=_typed(oraw, "property", str, f"{at}.offset_rule", where),
            min_value=_typed(oraw, "min_value", str, f"{at}.offset_rule", where),
            offset=float(_typed(oraw, "offset", (int, float), f"{at}.offset_rule", where)),
        )
    use_item_scale = m.get("use_item_scale", True)
    if not isinstance(use_item_scale, bool):
        raise where.error(f"{at}.use_item_scale", "must be true or false")
    return ModalityProfile(
        name=name,
        collections=tuple(collections),
        bands=bands,
        mask=mask,
        per_year=per_year,
        season=season,
        cloud_property=cloud_property,
        max_cloud=None if max_cloud is None else float(max_cloud),
        derived=derived,
        offset_rule=offset_rule,
        use_item_scale=use_item_scale,
    )


def _band(raw: Any, at: str, where: _Where) -> BandSpec:
    b = _mapping(raw, at, where)
    _keys(
        b,
        at,
        where,
        required={"name", "asset"},
        optional={"resampling", "nodata", "scale", "offset", "kind", "transform", "dtype"},
    )
    kind = _typed(b, "kind", str, at, where, optional=True) or "continuous"
    _choice(kind, KINDS, f"{at}.kind", where)
    resampling = _typed(b, "resampling", str, at, where, optional=True) or ("nearest" if kind == "class" else "bilinear")
    _choice(resampling, RESAMPLING, f"{at}.resampling", where)
    if kind == "class" and resampling not in ("nearest", "mode"):
        raise where.error(f"{at}.resampling", "must be nearest or mode for a class band")
    transform = _typed(b, "transform", str, at, where, optional=True)
    _choice(transform, TRANSFORMS, f"{at}.transform", where)
    dtype = _typed(b, "dtype", str, at, where, optional=True) or "float32"
    _choice(dtype, DTYPES, f"{at}.dtype", where)
    nodata = _typed(b, "nodata", (int, float), at, where, optional=True)
    scale = _typed(b, "scale", (int, float), at, where, optional=True)
    offset = _typed(b, "offset", (int, float), at, where, optional=True)
    return BandSpec(
        name=_typed(b, "name", str, at, where),
        asset=_typed(b, "asset", str, at, where),
        resampling=resampling,
        nodata=None if nodata is None else float(nodata),
        scale=1.0 if scale is None else float(scale),
        offset=0.0 if offset is None else float(offset),
        kind=kind,
        transform=transform,
        dtype=dtype,
    )
