"""Retrogressive thaw slump footprints for the synthetic demo region.

Two sources:

- synthetic outlines (teardrop and horseshoe), sized from a lognormal fitted to real RTS areas and
  elongations, drawn in a local frame whose +y axis points upslope (headwall at the top);
- real footprints read from any file in the ARTS schema (GeoJSON, GeoPackage, ...), moved into the
  region by translation only, so their shape and size are kept.

Growth by headwall retreat is a sweep of the footprint upslope (:func:`retreat`): the union of
copies shifted upslope, so the toe stays put and the new footprint contains the old one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon

from rtsmap.pipeline.errors import ConfigError

# Lognormal fitted (maximum likelihood: mean and std of ln(area)) to the 2,473 non-empty polygons
# of the ARTS sample (../shared/data/arts/ARTS_main_dataset_v.0.0.7-alpha.geojson, areas computed in
# EPSG:3413): median 0.74 ha, 5-95 % range 0.16-5.1 ha. Hardcoded because users' clones have no
# ../shared; refit with `np.log(gdf.geometry.area).agg(["mean", "std"])` if the sample changes.
AREA_LOG_MEAN = 8.914
AREA_LOG_STD = 1.082
# Elongation = long / short side of the minimum rotated rectangle, same sample (Polygon features):
# median 1.97, 10-90 % range 1.2-3.2.
ELONGATION_LOG_MEAN = 0.687
ELONGATION_LOG_STD = 0.374

# Bounds on sampled sizes: below ~0.1 ha a slump is a handful of 10 m pixels; above 8 ha it would
# take over a small demo region.
MIN_AREA_M2 = 1_000.0
MAX_AREA_M2 = 80_000.0

SHAPE_KINDS = ("teardrop", "horseshoe")


def sample_areas(rng: np.random.Generator, n: int, min_m2: float = MIN_AREA_M2, max_m2: float = MAX_AREA_M2) -> np.ndarray:
    """Draw slump areas from the ARTS-fitted lognormal, truncated to ``[min_m2, max_m2]``.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    n : int
        Number of areas.
    min_m2, max_m2 : float
        Truncation bounds in square metres (values outside are redrawn, not clipped, so the bounds
        do not pile up).

    Returns
    -------
    numpy.ndarray
        ``n`` areas in square metres.
    """
    out = np.empty(0)
    while out.size < n:
        draw = rng.lognormal(AREA_LOG_MEAN, AREA_LOG_STD, size=max(2 * n, 8))
        out = np.concatenate([out, draw[(draw >= min_m2) & (draw <= max_m2)]])
    return out[:n]


def sample_elongations(rng: np.random.Generator, n: int) -> np.ndarray:
    """Draw length/width ratios from the ARTS-fitted lognormal, clipped to [1.1, 4].

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    n : int
        Number of ratios.

    Returns
    -------
    numpy.ndarray
        ``n`` elongations (>= 1.1).
    """
    return np.clip(rng.lognormal(ELONGATION_LOG_MEAN, ELONGATION_LOG_STD, size=n), 1.1, 4.0)


def slump_outline(kind: str, area_m2: float, elongation: float, rng: np.random.Generator, n_vertices: int = 72) -> Polygon:
    """A slump footprint in a local frame: toe near y=0, headwall at the top (+y is upslope).

    Parameters
    ----------
    kind : {"teardrop", "horseshoe"}
        ``teardrop``: round headwall, narrowing to a pointed toe. ``horseshoe``: wide round
        headwall (amphitheatre) with a blunt, almost as wide toe.
    area_m2 : float
        Exact area of the result.
    elongation : float
        Length along the slope over width across it.
    rng : numpy.random.Generator
        Randomness for the wobble of the outline.
    n_vertices : int
        Vertices of the outline.

    Returns
    -------
    shapely.geometry.Polygon
        A valid polygon with its centroid at the origin.

    Raises
    ------
    ValueError
        If ``kind`` is unknown.
    """
    if kind not in SHAPE_KINDS:
        raise ValueError(f"unknown slump shape {kind!r}; expected one of {SHAPE_KINDS}")
    theta = np.linspace(0.0, 2.0 * np.pi, n_vertices, endpoint=False)
    t = (1.0 - np.cos(theta)) / 2.0  # 0 at the toe, 1 at the headwall
    if kind == "teardrop":
        # sin(theta) * sin(theta/2): zero width with a cusp at theta=0 (toe), round at theta=pi
        half_width = np.sin(theta) * np.sin(theta / 2.0) / 0.77
    else:
        # boxy toe (small exponent) blending into a round headwall (exponent 1)
        exponent = 0.45 + 0.55 * t
        half_width = np.sign(np.sin(theta)) * np.abs(np.sin(theta)) ** exponent * (0.85 + 0.15 * t)
    # low-frequency wobble so no two slumps are alike; smooth, so the outline stays simple
    wobble = np.ones_like(theta)
    for k in range(2, 6):
        wobble += rng.normal(0.0, 0.05 / k) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    x = 0.5 * half_width * wobble
    y = elongation * t * wobble
    poly = shapely.make_valid(Polygon(np.column_stack([x, y])))
    if not isinstance(poly, Polygon):
        poly = max(getattr(poly, "geoms", [poly]), key=lambda g: g.area)
    scale = np.sqrt(area_m2 / poly.area)
    poly = affinity.scale(poly, scale, scale, origin=(0, 0))
    c = poly.centroid
    return affinity.translate(poly, -c.x, -c.y)


def place(local: Polygon, center_xy: tuple[float, float], upslope: tuple[float, float]) -> Polygon:
    """Rotate a local-frame outline so its +y axis points ``upslope`` and move it to ``center_xy``.

    Parameters
    ----------
    local : shapely.geometry.Polygon
        Outline from :func:`slump_outline` (centroid at the origin).
    center_xy : tuple of float
        Map coordinates of the centroid.
    upslope : tuple of float
        Unit vector (map x, map y) pointing uphill.

    Returns
    -------
    shapely.geometry.Polygon
        The placed footprint.
    """
    angle = np.degrees(np.arctan2(upslope[1], upslope[0])) - 90.0
    rotated = affinity.rotate(local, angle, origin=(0, 0))
    return affinity.translate(rotated, center_xy[0], center_xy[1])


def move_to(footprint: Polygon, center_xy: tuple[float, float]) -> Polygon:
    """Translate a real footprint so its centroid lands on ``center_xy`` (shape and size kept).

    Parameters
    ----------
    footprint : shapely.geometry.Polygon
        Footprint in the target CRS (metres).
    center_xy : tuple of float
        New centroid.

    Returns
    -------
    shapely.geometry.Polygon
        The moved footprint.
    """
    c = footprint.centroid
    return affinity.translate(footprint, center_xy[0] - c.x, center_xy[1] - c.y)


def retreat(footprint: Polygon, upslope: tuple[float, float], distance_m: float, step_m: float = 4.0) -> Polygon:
    """Grow a footprint by headwall retreat: sweep it ``distance_m`` upslope.

    Parameters
    ----------
    footprint : shapely.geometry.Polygon
        Current footprint.
    upslope : tuple of float
        Unit vector pointing uphill.
    distance_m : float
        How far the headwall moves.
    step_m : float
        Spacing of the swept copies (finer than a pixel, so the sweep has no notches).

    Returns
    -------
    shapely.geometry.Polygon
        The grown footprint; it contains ``footprint``, so its area never decreases.
    """
    if distance_m <= 0:
        return footprint
    shifts = np.linspace(0.0, distance_m, int(np.ceil(distance_m / step_m)) + 1)
    copies = [affinity.translate(footprint, s * upslope[0], s * upslope[1]) for s in shifts]
    # simplify keeps the vertex count from piling up year after year; the union with the old
    # footprint puts back the slivers simplify shaved off, so the old footprint stays inside
    grown = shapely.union(shapely.union_all(copies).simplify(0.5), footprint)
    if not isinstance(grown, Polygon):
        grown = max(getattr(grown, "geoms", [grown]), key=lambda g: g.area)
    return grown


def read_footprints(path: str | Path, crs: str = "EPSG:3413") -> list[Polygon]:
    """Read real RTS footprints from an ARTS-schema vector file.

    Each feature gives one polygon: the largest part of a MultiPolygon, without holes. Empty and
    non-polygon geometries are skipped (the ARTS sample has an empty geometry collection).

    Parameters
    ----------
    path : str or pathlib.Path
        GeoJSON, GeoPackage or any vector file GDAL reads, with polygon geometries and a CRS.
    crs : str
        CRS to return the footprints in (metres).

    Returns
    -------
    list of shapely.geometry.Polygon
        Footprints in ``crs``, in file order.

    Raises
    ------
    ConfigError
        If the file cannot be read, has no CRS, or holds no polygons.
    """
    import geopandas as gpd  # heavy; only needed with --shapes

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--shapes file {path} does not exist; give an ARTS-schema GeoJSON or GeoPackage")
    try:
        gdf = gpd.read_file(path)
    except Exception as exc:  # pyogrio raises several types for unreadable files
        raise ConfigError(f"--shapes file {path} cannot be read as a vector file ({exc}); give an ARTS-schema GeoJSON or GeoPackage") from None
    if gdf.crs is None:
        raise ConfigError(f"--shapes file {path} has no CRS; set one (ARTS files are EPSG:3413)")
    gdf = gdf[[g is not None and not g.is_empty for g in gdf.geometry]].to_crs(crs)
    polygons = []
    for geom in gdf.geometry:
        if isinstance(geom, MultiPolygon):
            geom = max(geom.geoms, key=lambda g: g.area)
        if isinstance(geom, Polygon) and geom.area > 0:
            polygons.append(Polygon(geom.exterior))
    if not polygons:
        raise ConfigError(f"--shapes file {path} holds no polygon footprints; give RTS polygons in the ARTS schema")
    return polygons
