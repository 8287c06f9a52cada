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
      sar:
        catalog: https://planetarycomputer.microsoft.com/api/stac/v1   # this modality's own
        signing: planetary-computer                                    # (else the profile's)
        ...

The file is read by the strict reader of :mod:`rtsmap.config_schema` straight into the
dataclasses below (their annotations are the schema): unknown keys, wrong types and values out of
range are refused in one :class:`~rtsmap.pipeline.errors.ConfigError` line that names the file and
the key (``bad.yaml: profile.modalities.dem.max_clouds: ...``), because a typo in a profile
(``max_clouds``) would otherwise be ignored silently and change the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at
from pydantic import AfterValidator, BeforeValidator

from rtsmap.config_schema import Bool, Float, Int, Str, read_yaml, schema, validate
from rtsmap.pipeline.errors import ConfigError

RESAMPLING = ("nearest", "bilinear", "cubic", "average", "mode", "min", "max", "med")
KINDS = ("continuous", "class")
TRANSFORMS = ("db",)
SIGNINGS = ("planetary-computer",)
DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")
DERIVED = ("slope", "hillshade", "relative_elevation")

_MONTH_DAY = re.compile(r"^(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$")


def _month_day(value: str) -> str:
    if not _MONTH_DAY.match(value):
        raise ValueError(f'expected a "MM-DD" day such as "07-01", got {value!r}')
    return value


MonthDay = Annotated[Str, AfterValidator(_month_day)]
"""A day of the year as ``"MM-DD"``."""
Resampling = Literal[RESAMPLING]
BandKind = Literal[KINDS]
Transform = Literal[TRANSFORMS]
Signing = Literal[SIGNINGS]
DType = Literal[DTYPES]
Derived = Literal[DERIVED]


@schema
@dataclass(frozen=True)
class BandSpec:
    """One band of a modality, read from one STAC asset."""

    name: Str
    """Model-facing band name (``blue``, ``vv``, ``elevation``...)."""
    asset: Str
    """STAC asset key that holds the band."""
    resampling: Resampling = "bilinear"
    """Resampling used to bring the asset onto the grid (rasterio/GDAL name)."""
    nodata: Float | None = None
    """Raw value that marks missing pixels; None means the file's own nodata (or none)."""
    scale: Float = 1.0
    """Physical value = raw * scale + offset (before ``transform``)."""
    offset: Float = 0.0
    """See ``scale``."""
    kind: BandKind = "continuous"
    """``continuous`` (interpolate) or ``class`` (categorical: nearest only)."""
    transform: Transform | None = None
    """Applied after scale/offset: None, or ``db`` (10 * log10(value); linear power -> dB)."""
    dtype: DType = "float32"
    """Data type of the stored raster; used for input size estimates."""


@schema
@dataclass(frozen=True)
class MaskSpec:
    """A class layer (e.g. Sentinel-2 SCL) whose listed values make a pixel invalid."""

    asset: Str
    """STAC asset key of the class layer."""
    invalid: tuple[Int, ...]
    """Class values that are invalid (no data, cloud, shadow...)."""
    dtype: DType = "uint8"
    """Data type of the stored class layer; used for input size estimates."""


@schema
@dataclass(frozen=True)
class OffsetRule:
    """An offset that applies only to items whose property is at least some value.

    Sentinel-2 L2A from processing baseline 04.00 (January 2022) stores reflectance with a
    +1000 DN offset, so reflectance = DN * 0.0001 - 0.1 there, and DN * 0.0001 before.
    """

    property: Str
    """Item property compared, e.g. ``s2:processing_baseline``."""
    min_value: Str
    """The rule applies when the property (compared as version numbers) is >= this."""
    offset: Float
    """Offset used instead of the band's own offset when the rule applies."""


@schema
@dataclass(frozen=True)
class ModalityProfile:
    """Where a modality (optical, sar, dem) lives and how to read it."""

    name: Str
    """Modality name: ``optical``, ``sar`` or ``dem``."""
    collections: Annotated[tuple[Str, ...], at.MinLen(1)]
    """STAC collection ids searched for this modality."""
    bands: Annotated[tuple[Annotated[BandSpec, BeforeValidator(_class_band_default)], ...], at.MinLen(1)]
    """Bands read from the items, in order."""
    mask: MaskSpec | None = None
    """Optional class layer marking invalid pixels."""
    per_year: Bool = True
    """True: searched once per year in ``season``; False (DEM): searched once, no date filter."""
    season: tuple[MonthDay, MonthDay] | None = None
    """Month-day window ("MM-DD", "MM-DD") searched each year, both days included."""
    cloud_property: Str | None = None
    """Item property holding the cloud cover percentage, e.g. ``eo:cloud_cover``."""
    max_cloud: Annotated[Float, at.Ge(0), at.Le(100)] | None = None
    """Items with more cloud than this (percent) are left out; None keeps all."""
    derived: tuple[Derived, ...] = ()
    """Model-facing layers derived from the bands (DEM: slope, hillshade, relative_elevation)."""
    offset_rule: OffsetRule | None = None
    """Per-item offset override (Sentinel-2 processing baseline >= 04.00)."""
    use_item_scale: Bool = True
    """Prefer the scale/offset an item's asset declares in ``raster:bands`` when present."""
    catalog: Str | None = None
    """Where this modality's items are: a STAC API URL or a local catalog file (a relative path is
    taken from the profile file's folder). Absent or null in the file: the profile's ``url``;
    :func:`load_profile` fills in the value that applies, so None here means "given with --catalog"."""
    signing: Signing | None = None
    """Asset href signing of this modality's catalog; absent or null in the file: the profile's
    (:func:`load_profile` fills it in)."""
    headers: dict[Str, Str] | None = field(default=None, hash=False)
    """Extra HTTP headers for this modality's API; absent or null in the file: the profile's
    (:func:`load_profile` fills it in). May hold a key: never logged or written out."""

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

    def catalogs(self) -> dict[str, str | None]:
        """Modality -> the catalog its items are searched in (None: to be given with --catalog)."""
        return {name: m.catalog for name, m in self.modalities.items()}


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


def _class_band_default(raw: Any) -> Any:
    """A class band given without ``resampling`` is read with nearest (bilinear would blend classes)."""
    if isinstance(raw, dict) and raw.get("kind") == "class" and "resampling" not in raw:
        return {**raw, "resampling": "nearest"}
    return raw


def _name_modalities(raw: Any) -> Any:
    """Each modality's key is its name; the mapping under the key does not repeat it."""
    if not isinstance(raw, dict):
        return raw
    named = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            if "name" in value:
                raise ValueError(f"unknown key 'name' under {key!r} (the key names the modality)")
            value = {"name": key, **value}
        named[key] = value
    return named


@schema
@dataclass(frozen=True, kw_only=True)
class _ProfileFile:
    """The top level of a profile file, in file order; the fields are those of :class:`CatalogProfile`."""

    name: Str
    """See :attr:`CatalogProfile.name`."""
    url: Str | None = None
    """See :attr:`CatalogProfile.url`."""
    signing: Signing | None = None
    """See :attr:`CatalogProfile.signing`."""
    headers: dict[Str, Str] = field(default_factory=dict)
    """See :attr:`CatalogProfile.headers`."""
    modalities: Annotated[dict[Str, ModalityProfile], BeforeValidator(_name_modalities), at.MinLen(1)]
    """See :attr:`CatalogProfile.modalities`."""


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
        One line naming the file and the key: the file is missing, is not YAML, is empty or not
        a mapping, or has unknown keys, missing keys, wrong types or values out of range.
    """
    path = Path(path)
    raw = read_yaml(path, "profile", ": give a profile name or a YAML file path")
    top = validate(_ProfileFile, raw, str(path), root="profile")
    for name, modality in top.modalities.items():
        _check_modality(modality, f"profile.modalities.{name}", path)
    modalities = {name: _with_access(m, top, path) for name, m in top.modalities.items()}
    return CatalogProfile(
        name=top.name,
        url=top.url,
        modalities=modalities,
        signing=top.signing,
        headers=dict(top.headers),
        source=str(path),
    )


def _check_modality(m: ModalityProfile, at_key: str, path: Path) -> None:
    """The rules that tie one field to another (the types check each field alone)."""
    if m.season is not None and m.season[0] > m.season[1]:
        raise ConfigError(f"{path}: {at_key}.season: must not wrap around the new year (start after end)")
    if m.per_year and m.season is None:
        raise ConfigError(f"{path}: '{at_key}.season' is required when per_year is true")
    if m.max_cloud is not None and m.cloud_property is None:
        raise ConfigError(f"{path}: '{at_key}.cloud_property' is required with max_cloud")
    for i, band in enumerate(m.bands):
        if band.kind == "class" and band.resampling not in ("nearest", "mode"):
            raise ConfigError(
                f"{path}: {at_key}.bands[{i}].resampling: must be nearest or mode for a class band, "
                f"got {band.resampling!r}"
            )


def _with_access(m: ModalityProfile, top: _ProfileFile, path: Path) -> ModalityProfile:
    """The modality with the catalog, signing and headers that apply to it (its own, else the profile's)."""
    catalog = m.catalog if m.catalog is not None else top.url
    if catalog is not None and not re.match(r"^https?://", catalog) and not Path(catalog).is_absolute():
        # A local catalog named in a profile is found next to the profile, wherever the command runs.
        catalog = str(path.parent / catalog)
    return replace(
        m,
        catalog=catalog,
        signing=m.signing if m.signing is not None else top.signing,
        headers=dict(m.headers if m.headers is not None else top.headers),
    )
