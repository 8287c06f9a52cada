"""Read the area of interest (AOI) into the grid CRS.

The AOI is one dissolved, valid (multi)polygon in the grid CRS (EPSG:3413 by default), plus a
WGS84 version of it for STAC searches. Pan-Arctic AOIs bring two traps that a naive
"read and ``to_crs``" falls into, and that this module handles:

- **The antimeridian.** A GeoJSON ring that goes from +179 to -179 degrees longitude means a
  short hop across the antimeridian, but read literally (planar lon/lat) it is a polygon
  spanning 358 degrees the other way round. Such rings are detected (an edge whose longitude
  jumps by more than 180 degrees) and unwrapped to continuous longitudes before projecting. In
  EPSG:3413 the result is an ordinary polygon; for STAC it is split at +/-180 into a
  MultiPolygon (RFC 7946, section 3.1.9).
- **The pole.** A polar cap written as a lon/lat polygon (e.g. ``lat >= 85`` as the box
  -180..180 x 85..90) has straight edges in lon/lat that must follow the parallels; the
  geometry is densified (0.1 degree) before projecting, so in EPSG:3413 it becomes a disc
  around (0, 0). For STAC, an AOI that contains a pole becomes a band covering all longitudes
  from the pole down to the AOI's lowest latitude.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.errors
import shapely
import shapely.affinity
import shapely.errors
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError, ProjError
from shapely.geometry import MultiPolygon, Point, Polygon, box
from shapely.geometry.base import BaseGeometry

from rtsmap.pipeline.errors import AOIError, ConfigError

WGS84 = "EPSG:4326"
DENSIFY_DEGREES = 0.1
"""Longest lon/lat edge before projecting, so edges follow parallels and meridians."""

DENSIFY_PARTS = 512
"""A projected AOI is densified to edges of at most 1/DENSIFY_PARTS of its larger side
before it is reprojected (it has no natural unit like the degree)."""

# GDAL drivers whose files are lon/lat WGS84 when they say nothing about their CRS (RFC 7946).
_GEOJSON_DRIVERS = {"GeoJSON", "GeoJSONSeq", "TopoJSON"}


@dataclass(frozen=True)
class AOI:
    """An area of interest, ready for the grid and for STAC searches."""

    geometry: BaseGeometry
    """Polygon or MultiPolygon in the grid CRS: valid, dissolved, non-zero area."""

    crs: str
    """The grid CRS of ``geometry``, as given to :func:`read_aoi` (e.g. ``"EPSG:3413"``)."""

    geometry_wgs84: BaseGeometry
    """The AOI in EPSG:4326 for STAC ``intersects`` searches; longitudes within -180..180.
    Split into a MultiPolygon where the AOI crosses the antimeridian; a band over all
    longitudes from the pole down to the AOI's lowest latitude where it contains a pole."""

    bbox_wgs84: tuple[float, float, float, float]
    """(west, south, east, north) in degrees. Where the AOI crosses the antimeridian,
    west > east (the STAC/GeoJSON convention); for an AOI containing a pole, west=-180 and
    east=180."""

    source: str
    """The file the AOI was read from."""


def read_aoi(path: str | Path, crs: str = "EPSG:3413", *, layer: str | None = None) -> AOI:
    """Read an AOI file and bring it into the grid CRS.

    Parameters
    ----------
    path : str or Path
        Any vector file GDAL opens (GeoJSON, GeoPackage, Shapefile, ...). A file with several
        layers needs one chosen: ``layer``, or ``path.gpkg:layer`` (used when ``path`` itself is
        not a file). All features of the layer are dissolved into one geometry. Features with a
        null or empty geometry are ignored.
    crs : str
        The grid CRS (projected, e.g. ``"EPSG:3413"``).
    layer : str, optional
        The layer to read (default: the file's only layer).

    Returns
    -------
    AOI
        The dissolved AOI in the grid CRS and in WGS84.

    Raises
    ------
    AOIError
        The file is missing or unreadable; it has several layers and none was chosen, or the
        chosen layer does not exist; it has no features or only empty geometries; a vertex is
        not a finite number (NaN, infinity); a
        geometry is not polygonal (points and lines are refused: buffer them first); nothing
        polygonal remains after repairing invalid geometries; the file has no CRS (GeoJSON
        without one is taken as WGS84, per RFC 7946); the AOI has zero area or cannot be
        represented in the grid CRS.
    ConfigError
        ``crs`` is not a projected CRS.

    Notes
    -----
    Invalid geometries (self-intersections, bow-ties) are repaired with
    :func:`shapely.make_valid`, keeping only polygonal parts. A lon/lat ring around a pole
    that never reaches latitude +/-90 (not valid GeoJSON) is not supported: write the cap with
    its pole edge (e.g. ``-180,85 180,85 180,90 -180,90``).
    """
    path, layer = _split_layer(Path(path), layer)
    grid_crs = _grid_crs(crs)
    if not path.exists():
        raise AOIError(f"AOI file {path} does not exist; give the path of a GeoJSON, "
                       "GeoPackage or Shapefile with the AOI polygon(s)")
    if path.is_dir() and path.suffix.lower() != ".gdb":
        raise AOIError(f"AOI {path} is a folder; give the path of a GeoJSON, GeoPackage or "
                       "Shapefile with the AOI polygon(s)")
    geoms, src_crs = _read_polygons(path, layer)
    try:
        return _build(path, crs, grid_crs, geoms, src_crs)
    except (shapely.errors.GEOSException, ProjError, ValueError, TypeError, OverflowError) as exc:
        # GEOS, PROJ and numpy refuse some degenerate geometries after our own checks; the
        # file is still the problem, not the program.
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise AOIError(f"AOI file {path}: the geometry cannot be used ({message}); check "
                       "its rings (finite coordinates, at least 3 distinct corners)") from None


def _split_layer(path: Path, layer: str | None) -> tuple[Path, str | None]:
    """``file.gpkg:layer`` -> (file.gpkg, layer), when the whole string is not a file itself."""
    text = str(path)
    if layer is None and not path.exists() and ":" in text:
        head, _, tail = text.rpartition(":")
        if head and tail and Path(head).is_file():
            return Path(head), tail
    return path, layer


def _build(path: Path, crs: str, grid_crs: CRS, geoms: list[BaseGeometry], src_crs: CRS) -> AOI:
    """The AOI from its polygons in their source CRS (see :func:`read_aoi`)."""
    if src_crs.is_geographic:
        lonlat = _lonlat_from_geographic(geoms, src_crs, path)
        grid_geom = _project(shapely.segmentize(lonlat, DENSIFY_DEGREES),
                             CRS.from_user_input(WGS84), grid_crs, path)
    else:
        src_geom = _repair(geoms, path)
        if src_crs == grid_crs:
            grid_geom = src_geom
        else:
            grid_geom = _project(_densify_projected(src_geom), src_crs, grid_crs, path)
        lonlat = None  # computed below only if needed

    if grid_geom.is_empty or grid_geom.area <= 0:
        raise AOIError(f"AOI file {path}: the AOI has zero area in {crs}; "
                       "it must contain at least one polygon with a non-zero area")

    pole_lat = _pole_inside(grid_geom, grid_crs)
    if pole_lat is not None:
        # The latitudes the AOI reaches: from the lon/lat input if there is one, else from
        # its projected boundary.
        if lonlat is not None:
            lat_min, lat_max = lonlat.bounds[1], lonlat.bounds[3]
        else:
            lats = _boundary_latitudes(grid_geom, grid_crs)
            lat_min, lat_max = lats.min(), lats.max()
        if pole_lat > 0:
            geometry_wgs84 = box(-180.0, float(lat_min), 180.0, 90.0)
        else:
            geometry_wgs84 = box(-180.0, -90.0, 180.0, float(lat_max))
        bbox = tuple(float(v) for v in geometry_wgs84.bounds)
    else:
        if lonlat is None:
            lonlat = _lonlat_from_projected(src_geom, src_crs, path)
        geometry_wgs84, bbox = _split_antimeridian(lonlat)

    return AOI(geometry=grid_geom, crs=crs, geometry_wgs84=geometry_wgs84,
               bbox_wgs84=bbox, source=str(path))


def _grid_crs(crs: str) -> CRS:
    try:
        grid_crs = CRS.from_user_input(crs)
    except CRSError as exc:
        raise ConfigError(f"grid CRS {crs!r} is not a CRS pyproj knows: {exc}") from exc
    if not grid_crs.is_projected:
        raise ConfigError(f"grid CRS {crs!r} is not projected; use a projected CRS in "
                          "metres such as EPSG:3413")
    return grid_crs


def _read_polygons(path: Path, layer: str | None = None) -> tuple[list[BaseGeometry], CRS]:
    """Read a layer's non-empty geometries, check they are polygonal and finite, and its CRS."""
    try:
        layers = [str(name) for name, _ in pyogrio.list_layers(path)]
        if len(layers) == 0:
            raise AOIError(f"AOI file {path} has no layers; it must hold AOI polygon(s)")
        if layer is None:
            if len(layers) > 1:
                raise AOIError(f"AOI file {path} has {len(layers)} layers ({', '.join(layers[:10])}"
                               f"{', ...' if len(layers) > 10 else ''}); choose one as {path}:LAYER")
            layer = layers[0]
        elif layer not in layers:
            raise AOIError(f"AOI file {path} has no layer {layer!r}; its layers: {', '.join(layers[:10])}")
        driver = pyogrio.read_info(path, layer=layer)["driver"]
        # Attributes are not needed and can fail to parse; read geometries only. GDAL's and
        # shapely's warnings on broken input would print beside our own one-line error.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            frame = pyogrio.read_dataframe(path, layer=layer, columns=[])
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError,
            pyogrio.errors.GeometryError, pyogrio.errors.FeatureError,
            pyogrio.errors.FieldError, pyogrio.errors.CRSError, OSError, ValueError,
            shapely.errors.GEOSException) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise AOIError(f"cannot read AOI file {path}: {message}. Give a GeoJSON, GeoPackage or "
                       "Shapefile that GDAL can open") from None

    if len(frame) == 0:
        raise AOIError(f"AOI file {path} has no features; it must hold AOI polygon(s)")

    if frame.crs is not None:
        try:
            src_crs = CRS.from_user_input(frame.crs)
        except CRSError as exc:
            raise AOIError(f"AOI file {path}: its CRS is not one PROJ knows ({exc})") from None
    elif driver in _GEOJSON_DRIVERS:
        src_crs = CRS.from_user_input(WGS84)  # RFC 7946: GeoJSON is lon/lat WGS84
    else:
        raise AOIError(f"AOI file {path} ({driver}) has no CRS; add one (e.g. a .prj file "
                       "for a Shapefile, or save it again with its CRS) or use GeoJSON in "
                       "lon/lat WGS84")

    values = np.asarray(frame.geometry.values, dtype=object)
    keep = ~(shapely.is_missing(values) | shapely.is_empty(values))
    if not keep.any():
        raise AOIError(f"AOI file {path}: all {len(values)} features have empty or null "
                       "geometries; it must hold AOI polygon(s)")

    for index in np.flatnonzero(keep):
        if not np.isfinite(shapely.get_coordinates(values[index])).all():
            raise AOIError(f"AOI file {path}: feature {index} has a vertex that is not a finite "
                           "number (NaN or infinity); fix or remove it")
    polygons = []
    for index in np.flatnonzero(keep):
        for part in shapely.get_parts(values[index]):
            if part.is_empty:
                continue
            # MultiPolygons nested in a GeometryCollection come out whole from get_parts.
            if isinstance(part, (Polygon, MultiPolygon)):
                polygons.append(part)
            else:
                raise AOIError(
                    f"AOI file {path}: feature {index} is a {part.geom_type}, but an AOI "
                    "must be polygons. If you mean an area around points or lines, buffer "
                    "them into polygons first (e.g. geopandas .buffer in a metric CRS)")
    return polygons, src_crs


def polygonal_parts(geom: BaseGeometry) -> list[Polygon]:
    """The non-empty polygons in any geometry, collections flattened.

    Drops the points and lines that ``make_valid`` or an overlay cut along shared edges leaves.

    Parameters
    ----------
    geom : shapely geometry
        Any geometry.

    Returns
    -------
    list of Polygon
    """
    out = []
    for part in shapely.get_parts(geom):
        if isinstance(part, Polygon) and not part.is_empty:
            out.append(part)
        elif isinstance(part, (MultiPolygon, shapely.GeometryCollection)):
            out.extend(polygonal_parts(part))
    return out


def _repair(geoms: BaseGeometry | list[BaseGeometry], path: Path) -> BaseGeometry:
    """Make each geometry valid, keep polygonal parts and dissolve; AOIError if none remain.

    Each geometry is repaired before the union because GEOS cannot union invalid input.
    """
    if isinstance(geoms, BaseGeometry):
        geoms = [geoms]
    polygons = []
    for geom in geoms:
        polygons.extend(polygonal_parts(geom if geom.is_valid else shapely.make_valid(geom)))
    if not polygons:
        raise AOIError(f"AOI file {path}: the geometry is invalid and nothing polygonal "
                       "remains after repairing it; check the polygon rings (at least 3 "
                       "distinct corners, not collapsed to a line)")
    return shapely.union_all(polygons)


def _crosses_antimeridian(polygon: Polygon) -> bool:
    """True if a ring hops across +/-180 (an edge whose longitude jumps by more than 180)."""
    for ring in (polygon.exterior, *polygon.interiors):
        lon = np.asarray(ring.coords)[:, 0]
        a, b = lon[:-1], lon[1:]
        jump = np.abs(b - a) > 180.0
        # An edge from -180 to +180 (or back) runs along a parallel all the way round: the
        # lower edge of a polar cap, not a hop across the antimeridian.
        along = (np.abs(a) == 180.0) & (np.abs(b) == 180.0)
        if np.any(jump & ~along):
            return True
    return False


def _unwrap_polygon(polygon: Polygon) -> Polygon:
    """Make each ring's longitudes continuous (e.g. 179, -179 -> 179, 181).

    Holes are shifted by whole turns to lie next to their exterior ring.
    """
    def unwrap(ring):
        xy = np.array(ring.coords)[:, :2]
        xy[:, 0] = np.unwrap(xy[:, 0], period=360.0)
        return xy

    exterior = unwrap(polygon.exterior)
    centre = exterior[:, 0].mean()
    holes = []
    for ring in polygon.interiors:
        hole = unwrap(ring)
        hole[:, 0] -= 360.0 * np.round((hole[:, 0].mean() - centre) / 360.0)
        holes.append(hole)
    return Polygon(exterior, holes)


def _lonlat_from_geographic(geoms: list[BaseGeometry], src_crs: CRS, path: Path) -> BaseGeometry:
    """Input polygons in a geographic CRS -> one valid lon/lat geometry, longitudes unwrapped
    where a polygon crosses the antimeridian (so they may leave -180..180)."""
    wgs84 = CRS.from_user_input(WGS84)
    polygons = []
    for geom in geoms:
        if src_crs != wgs84:
            geom = _project(geom, src_crs, wgs84, path)
        for polygon in shapely.get_parts(geom):
            if _crosses_antimeridian(polygon):
                polygon = _unwrap_polygon(polygon)
            polygons.append(polygon)
    return _repair(polygons, path)


def _lonlat_from_projected(geom: BaseGeometry, src_crs: CRS, path: Path) -> BaseGeometry:
    """A projected AOI (not containing a pole) -> lon/lat with continuous longitudes."""
    lonlat = _project(_densify_projected(geom), src_crs, CRS.from_user_input(WGS84), path)
    return _repair([_unwrap_polygon(p) for p in polygonal_parts(lonlat)], path)


def _densify_projected(geom: BaseGeometry) -> BaseGeometry:
    minx, miny, maxx, maxy = geom.bounds
    step = max(maxx - minx, maxy - miny) / DENSIFY_PARTS
    return shapely.segmentize(geom, step) if step > 0 else geom


def _project(geom: BaseGeometry, src: CRS, dst: CRS, path: Path) -> BaseGeometry:
    """Reproject vertex by vertex (always x=lon, y=lat), then repair what projecting broke
    (e.g. the edge of a polar cap along latitude 90 collapses to one point)."""
    transformer = Transformer.from_crs(src, dst, always_xy=True)

    def apply(xy: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    out = shapely.transform(geom, apply)
    coords = shapely.get_coordinates(out)
    if not np.isfinite(coords).all() or (np.abs(coords) > 1e15).any():
        raise AOIError(f"AOI file {path}: the AOI cannot be projected from "
                       f"{src.to_string()} to {dst.to_string()} (it reaches where that "
                       "projection is undefined); use an AOI inside the grid CRS's area")
    return _repair(out, path)


def _pole_inside(geom: BaseGeometry, crs: CRS) -> float | None:
    """90 or -90 if the AOI (in the grid CRS) contains the North or South Pole, else None."""
    transformer = Transformer.from_crs(WGS84, crs, always_xy=True)
    for lat in (90.0, -90.0):
        x, y = transformer.transform(0.0, lat)
        if np.isfinite(x) and np.isfinite(y) and geom.contains(Point(x, y)):
            return lat
    return None


def _boundary_latitudes(geom: BaseGeometry, crs: CRS) -> np.ndarray:
    boundary = _densify_projected(geom.boundary)
    xy = shapely.get_coordinates(boundary)
    transformer = Transformer.from_crs(crs, WGS84, always_xy=True)
    _, lat = transformer.transform(xy[:, 0], xy[:, 1])
    return np.asarray(lat)


def _split_antimeridian(lonlat: BaseGeometry) -> tuple[BaseGeometry, tuple[float, ...]]:
    """Cut a lon/lat geometry with unwrapped longitudes into -180..180 pieces.

    Written by hand (a few lines) because odc-geo's ``wrapdateline`` works on a projected
    source geometry and we already hold the unwrapped lon/lat one.
    """
    pieces = []
    for turn in (-360.0, 0.0, 360.0):
        window = box(-180.0 + turn, -90.0, 180.0 + turn, 90.0)
        piece = polygonal_parts(lonlat.intersection(window))
        if piece:
            pieces.append(shapely.affinity.translate(shapely.union_all(piece), xoff=-turn))
    geom = shapely.union_all(pieces)
    if len(pieces) == 1:
        return geom, tuple(float(v) for v in geom.bounds)
    minx, miny, maxx, maxy = lonlat.bounds
    if maxx - minx >= 360.0:
        return geom, (-180.0, float(miny), 180.0, float(maxy))

    def wrap(lon: float) -> float:
        return float((lon + 180.0) % 360.0 - 180.0)

    # STAC/GeoJSON convention for a bbox crossing the antimeridian: west > east.
    return geom, (wrap(minx), float(miny), wrap(maxx), float(maxy))
