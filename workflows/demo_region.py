"""A synthetic multimodal demo region: terrain, slumps, optical, SAR and DEM scenes, and STAC.

Real imagery cannot be fetched everywhere rtsmap is tested, so this region stands in for it in
tests, in ``rtsmap demo`` and in the demo model's training. It is built so that fusion matters:

- active slumps: a depression under a steep headwall in the DEM, bright bare soil (low NDVI) in the
  optical scenes, and in SAR a floor at the slump's own contrast to the tundra (-1 to +3 dB in VV,
  so some are invisible there); they grow upslope every year and new ones appear;
- some slumps sit under cloud in every optical scene of a year: only SAR (where their contrast
  is strong) and the DEM (where they are older than it) show them;
- SAR is an RTC-like gamma0: speckle of 4.4 looks, layover and shadow on steep slopes, and a
  spatially smooth soil-moisture and wet-snow offset that changes every year
  (``SarModel``; docs/synthetic-sar.md gives the parameters and their sources);
- bare ridges look like slumps optically (bright, low NDVI) but have no depression;
- old stabilised slumps have the depression but are green: not labelled as RTS;
- lakes (flat, dark water) and rivers in valleys.

The scene is drawn once on a fine EPSG:3413 canvas and then resampled to each modality's native
grid (Sentinel-2 in UTM 8N at 10 m, Sentinel-1 in UTM 9N at 20 m, the DEM in EPSG:3413 at 10 m)
with ``rasterio.warp.reproject``, so the pipeline's co-registration is exercised for real.
The DEM is a single snapshot taken in the first year: slumps that appear later have no depression
in it (as with a real, older ArcticDEM strip).

Everything is deterministic given the seed. Only numpy, rasterio, shapely, pyproj and pystac are
used (no torch): this module is part of the inference install.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import pystac
import rasterio
import rasterio.features
import rasterio.shutil
import rasterio.warp
import shapely
from affine import Affine
from pyproj import Transformer
from pystac.extensions.eo import EOExtension
from pystac.extensions.projection import ProjectionExtension
from rasterio.enums import Resampling
from rasterio.io import MemoryFile
from shapely import affinity
from shapely.geometry import LineString, Polygon, box, mapping

from rtsmap.pipeline.errors import ConfigError, OutputError
from rtsmap.workflows import shapes as shp
from rtsmap.workflows.config import YEAR_MAX, YEAR_MIN, parse_years

# --- what the demo region is: names the `demo` profile (workflows/profiles/demo.yaml) relies on ---

REGION_CENTER_LONLAT = (-135.3, 67.4)
MIN_YEAR, MAX_YEAR = YEAR_MIN, YEAR_MAX  # the bounds of the one year parser
"""Years a synthetic region may carry (a typo such as 20211 is refused, not generated)."""
MAX_YEARS = 30
"""Most years in one region (each year writes several scenes)."""
"""Peel Plateau, NW Canada: thousands of real slumps on valley sides of glaciated terrain."""
REGION_NAME = "Synthetic Peel Plateau (rtsmap demo)"

DEM_CRS, DEM_RES = "EPSG:3413", 10.0
OPTICAL_CRS, OPTICAL_RES = "EPSG:32608", 10.0
SAR_CRS, SAR_RES = "EPSG:32609", 20.0

OPTICAL_COLLECTION = "rtsmap-demo-s2-l2a"
SAR_COLLECTION = "rtsmap-demo-s1-rtc"
DEM_COLLECTION = "rtsmap-demo-dem"
OPTICAL_BANDS = ("blue", "green", "red", "nir")
SAR_BANDS = ("vv", "vh")

DEM_NODATA = -9999.0
SCL_NODATA, SCL_SHADOW, SCL_VEGETATION, SCL_BARE, SCL_WATER = 0, 3, 4, 5, 6
SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_CIRRUS = 8, 9, 10

# Feature densities per km2 (Peel Plateau valley sides carry roughly one active slump per km2).
ACTIVE_PER_KM2 = 1.0
NEW_PER_KM2_PER_YEAR = 0.25
STABILISED_PER_KM2 = 0.35
RIDGES_PER_KM2 = 0.4
LAKES_PER_KM2 = 0.12

NATIVE_PAD_M = 150.0
"""The native rasters reach this far beyond the region square, so the AOI is covered whole."""
AOI_INSET_M = 100.0
"""The AOI is the region square shrunk by this much (its edge never touches a raster edge)."""
PLACEMENT_INSET_M = 120.0
"""Features keep this far from the region edge (grown slumps included)."""


@dataclass(frozen=True)
class DemoRegion:
    """Paths of a generated demo region (all absolute)."""

    root: Path
    """The output directory."""
    aoi: Path
    """``aoi.geojson``: the AOI polygon in EPSG:4326."""
    truth: Path
    """``truth.gpkg``: true RTS per year (layers ``rts_<year>``) and a ``distractors`` layer."""
    items: Path
    """``stac/items.json``: an ItemCollection with every item (absolute asset hrefs)."""
    items_ndjson: Path
    """``stac/items.ndjson``: the same items, one JSON object per line."""
    catalog: Path
    """``stac/catalog.json``: a self-contained static catalog (catalog -> collections -> items)."""
    collections: tuple[Path, ...]
    """``stac/collections/<id>.json``: standalone collections, for loading into a STAC API."""
    region_json: Path
    """``region.json``: what was generated (seed, years, sizes, CRSs, counts, item ids)."""
    years: tuple[int, ...]
    """The years with scenes and truth layers."""
    seed: int
    """The seed the region was generated from."""


# ------------------------------------------------------------------------------------------------
# Raster helpers. Hand-written because scipy is not a dependency: a Gaussian blur and fractal noise
# are a few lines with numpy's FFT.
# ------------------------------------------------------------------------------------------------


def _blur(a: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur through the FFT, with reflected padding so edges do not wrap around."""
    if sigma_px <= 0:
        return a.astype(np.float32)
    pad = int(np.ceil(3 * sigma_px))
    p = np.pad(a.astype(np.float64), pad, mode="reflect")
    fy = np.fft.fftfreq(p.shape[0])[:, None]
    fx = np.fft.rfftfreq(p.shape[1])[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fx**2 + fy**2))
    out = np.fft.irfft2(np.fft.rfft2(p) * kernel, s=p.shape)
    return out[pad:-pad, pad:-pad].astype(np.float32)


def _fractal(rng: np.random.Generator, shape: tuple[int, int], beta: float, cutoff_px: float = 2.0) -> np.ndarray:
    """Zero-mean, unit-std noise with a 1/f**beta power spectrum (bigger beta: smoother)."""
    white = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f = np.maximum(f, 1.0 / max(shape))
    amp = f ** (-beta / 2.0) * np.exp(-((f * cutoff_px) ** 2))
    out = np.fft.irfft2(np.fft.rfft2(white) * amp, s=shape)
    out -= out.mean()
    return (out / (out.std() + 1e-12)).astype(np.float32)


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass(frozen=True)
class _Grid:
    """A raster grid: CRS, transform, shape."""

    crs: str
    transform: Affine
    shape: tuple[int, int]

    @property
    def res(self) -> float:
        return self.transform.a

    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Map coordinates of pixel centres, as 2D arrays."""
        rows, cols = np.indices(self.shape, dtype=np.float64)
        x = self.transform.c + (cols + 0.5) * self.transform.a
        y = self.transform.f + (rows + 0.5) * self.transform.e
        return x, y

    def footprint(self) -> Polygon:
        h, w = self.shape
        x0, y0 = self.transform.c, self.transform.f
        return box(x0, y0 + h * self.transform.e, x0 + w * self.transform.a, y0)


def _snapped_grid(bounds: tuple[float, float, float, float], crs: str, res: float) -> _Grid:
    """A north-up grid covering ``bounds``, its origin on a multiple of ``res`` (like real tiles)."""
    minx = np.floor(bounds[0] / res) * res
    maxy = np.ceil(bounds[3] / res) * res
    w = int(np.ceil((bounds[2] - minx) / res))
    h = int(np.ceil((maxy - bounds[1]) / res))
    return _Grid(crs, Affine(res, 0.0, minx, 0.0, -res, maxy), (h, w))


def _to_crs(geom, src: str, dst: str, densify_m: float | None = 50.0):
    """Reproject a shapely geometry (densified first, so straight edges bend correctly)."""
    if densify_m:
        geom = shapely.segmentize(geom, densify_m)
    tr = Transformer.from_crs(src, dst, always_xy=True)
    return shapely.transform(geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))


def _rasterize(geoms, grid: _Grid) -> np.ndarray:
    """0/1 float32 mask of ``geoms`` on ``grid``."""
    geoms = [g for g in geoms if g is not None and not g.is_empty]
    if not geoms:
        return np.zeros(grid.shape, np.float32)
    return rasterio.features.rasterize(
        [(g, 1) for g in geoms], out_shape=grid.shape, transform=grid.transform, dtype="uint8"
    ).astype(np.float32)


def _resample(fine: np.ndarray, src: _Grid, dst: _Grid, resampling: Resampling) -> np.ndarray:
    """Resample a canvas layer to a native grid; pixels the canvas does not cover become NaN."""
    out = np.full(dst.shape, np.nan, np.float32)
    rasterio.warp.reproject(
        fine.astype(np.float32),
        out,
        src_transform=src.transform,
        src_crs=src.crs,
        dst_transform=dst.transform,
        dst_crs=dst.crs,
        resampling=resampling,
        dst_nodata=np.nan,
        num_threads=1,
    )
    return out


def _write_cog(path: Path, data: np.ndarray, grid: _Grid, nodata: float, overview_resampling: str) -> None:
    """Write one band as a tiled (256 x 256), deflate-compressed COG with at least two overviews."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = data.shape
    profile = dict(
        driver="GTiff", height=h, width=w, count=1, dtype=data.dtype.name, crs=grid.crs,
        transform=grid.transform, nodata=nodata,
    )
    # GDAL's COG driver only copies from an existing dataset, hence the in-memory GTiff first.
    with MemoryFile() as mem:
        with mem.open(**profile) as ds:
            ds.write(data, 1)
        with mem.open() as src:
            rasterio.shutil.copy(
                src, path, driver="COG", BLOCKSIZE=256, COMPRESS="DEFLATE",
                OVERVIEW_COUNT=max(2, int(np.log2(max(h, w) / 64))),
                OVERVIEW_RESAMPLING=overview_resampling,
            )


# ------------------------------------------------------------------------------------------------
# The scene: terrain and features on the fine canvas
# ------------------------------------------------------------------------------------------------


@dataclass
class _Slump:
    """One active slump: its footprint per year (absent before it appears)."""

    slump_id: str
    shape_type: str
    upslope: tuple[float, float]
    first_year: int
    footprints: dict[int, Polygon]
    depth_m: float


@dataclass
class _Scene:
    """Everything drawn on the canvas that does not change between scenes."""

    canvas: _Grid
    region: Polygon
    elevation: np.ndarray
    water: np.ndarray
    ridges: np.ndarray
    stabilised: np.ndarray
    veg_texture: tuple[np.ndarray, np.ndarray]
    slumps: list[_Slump] = field(default_factory=list)
    distractors: list[tuple[str, str, Polygon]] = field(default_factory=list)
    rivers: list[LineString] = field(default_factory=list)


def _terrain(rng: np.random.Generator, canvas: _Grid, region: Polygon, n_rivers: int) -> tuple[np.ndarray, list[LineString], list[Polygon]]:
    """Base elevation (hills, regional tilt, river valleys) and the river channels."""
    res = canvas.res
    x, y = canvas.xy()
    cx, cy = region.centroid.x, region.centroid.y
    tilt_dir = rng.uniform(0, 2 * np.pi)
    downhill = np.array([np.cos(tilt_dir), np.sin(tilt_dir)])
    elev = 380.0 - 0.008 * ((x - cx) * downhill[0] + (y - cy) * downhill[1])
    elev += 18.0 * _fractal(rng, canvas.shape, beta=3.4, cutoff_px=60.0 / res)
    elev += 0.4 * _fractal(rng, canvas.shape, beta=2.0, cutoff_px=10.0 / res)

    # Rivers run roughly downhill across the region and meander; their valleys are computed on a
    # coarse grid (valley walls are smooth) and resampled to the canvas.
    coarse = _Grid(canvas.crs, canvas.transform @ Affine.scale(4.0), (canvas.shape[0] // 4 + 1, canvas.shape[1] // 4 + 1))
    cxs, cys = coarse.xy()
    pts = shapely.points(cxs.ravel(), cys.ravel())
    valley = np.zeros(coarse.shape, np.float32)
    half = max(region.bounds[2] - region.bounds[0], region.bounds[3] - region.bounds[1])
    rivers, channels = [], []
    normal = np.array([-downhill[1], downhill[0]])
    for k in range(n_rivers):
        across = (k + 0.5) / n_rivers - 0.5 + rng.uniform(-0.15, 0.15) / n_rivers
        s = np.linspace(-half, half, 200)
        wiggle = 90.0 * np.sin(2 * np.pi * s / rng.uniform(600, 1100) + rng.uniform(0, 6.3))
        wiggle += 40.0 * np.sin(2 * np.pi * s / rng.uniform(250, 400) + rng.uniform(0, 6.3))
        off = across * half * 1.6 + wiggle
        line = LineString(np.column_stack([cx + s * downhill[0] + off * normal[0], cy + s * downhill[1] + off * normal[1]]))
        rivers.append(line)
        d = shapely.distance(pts, line).reshape(coarse.shape)
        depth, width = rng.uniform(20, 32), rng.uniform(140, 220)
        valley = np.minimum(valley, -depth * np.exp(-((d / width) ** 2)) - 4.0 * np.clip(1 - d / 50.0, 0, None))
        channels.append(line.buffer(rng.uniform(5, 9), quad_segs=4))
    elev += _resample(valley, coarse, canvas, Resampling.bilinear)
    return elev.astype(np.float32), rivers, channels


def _slope_and_upslope(elev: np.ndarray, res: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slope (degrees) and the upslope unit vector (map x, map y) of the smoothed terrain."""
    smooth = _blur(elev, 25.0 / res)
    drow, dcol = np.gradient(smooth, res)
    gx, gy = dcol, -drow  # map y grows northward, rows southward
    norm = np.hypot(gx, gy) + 1e-9
    return np.degrees(np.arctan(norm)), gx / norm, gy / norm


def _blob(rng: np.random.Generator, center: tuple[float, float], area_m2: float, elongation: float, roughness: float = 0.12) -> Polygon:
    """A wobbly ellipse of a given area, randomly oriented (lakes, ridge tops)."""
    theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 6):
        r += rng.normal(0, roughness / k) * np.sin(k * theta + rng.uniform(0, 6.3))
    r = np.clip(r, 0.5, None)
    poly = shapely.make_valid(Polygon(np.column_stack([elongation * r * np.cos(theta), r * np.sin(theta)])))
    if not isinstance(poly, Polygon):
        poly = max(poly.geoms, key=lambda g: g.area)
    poly = affinity.rotate(poly, rng.uniform(0, 180), origin=(0, 0))
    scale = np.sqrt(area_m2 / poly.area)
    return affinity.translate(affinity.scale(poly, scale, scale, origin=(0, 0)), *center)


def _same(geom: Polygon) -> tuple[Polygon, Polygon]:
    """A feature that is its own spacing geometry (for :func:`_place`)."""
    return geom, geom


def _keyed(fp: tuple[str, Polygon, tuple[float, float]]) -> tuple[Polygon, tuple]:
    """A (kind, footprint, upslope) feature spaced by its footprint (for :func:`_place`)."""
    return fp[1], fp


def _carve(elev: np.ndarray, canvas: _Grid, poly: Polygon, upslope: tuple[float, float], depth: float, edge_sigma_m: float, rng: np.random.Generator) -> None:
    """Cut a slump scar into ``elev`` in place: a floor sloping downhill under a steep headwall.

    The floor is a plane from the toe (original height) to the headwall (``depth`` metres below
    the rim, or deeper where the hillside is too gentle for the floor to slope downhill); the
    edge is softened over ``edge_sigma_m`` (a few metres: a steep headwall; tens: a degraded one).
    """
    res = canvas.res
    pad = 4 * edge_sigma_m + 2 * res
    minx, miny, maxx, maxy = poly.bounds
    inv = ~canvas.transform
    c0, r0 = (int(np.floor(v)) for v in inv @ (minx - pad, maxy + pad))
    c1, r1 = (int(np.ceil(v)) for v in inv @ (maxx + pad, miny - pad))
    r0, c0 = max(r0, 0), max(c0, 0)
    r1, c1 = min(r1, canvas.shape[0]), min(c1, canvas.shape[1])
    win = _Grid(canvas.crs, canvas.transform @ Affine.translation(c0, r0), (r1 - r0, c1 - c0))
    mask = _rasterize([poly], win)
    if mask.sum() == 0:
        return
    soft = np.clip(_blur(mask, edge_sigma_m / res) * 1.6, 0, 1) * _smoothstep(0.0, 0.3, _blur(mask, 0.5))
    x, y = win.xy()
    proj = x * upslope[0] + y * upslope[1]
    coords = np.asarray(poly.exterior.coords)
    pmin = (coords[:, 0] * upslope[0] + coords[:, 1] * upslope[1]).min()
    pmax = (coords[:, 0] * upslope[0] + coords[:, 1] * upslope[1]).max()
    t = np.clip((proj - pmin) / max(pmax - pmin, 1.0), 0, 1)
    sub = elev[r0:r1, c0:c1]
    inside = mask > 0
    toe = sub[inside & (t < 0.15)].mean() if np.any(inside & (t < 0.15)) else sub[inside].min()
    head = sub[inside & (t > 0.85)].mean() if np.any(inside & (t > 0.85)) else sub[inside].max()
    floor_head = min(head - depth, toe - 0.02 * (pmax - pmin))
    floor = toe + (floor_head - toe) * t + 0.3 * rng.standard_normal(t.shape).astype(np.float32)
    sub -= soft * np.clip(sub - floor, 0, None)


def _place(
    rng: np.random.Generator,
    n: int,
    region: Polygon,
    canvas: _Grid,
    accept,
    make,
    occupied: list[Polygon],
    tries_per_feature: int = 300,
) -> list:
    """Rejection-sample ``n`` features: ``accept(row, col, x, y)`` gates a site, ``make(x, y, row, col)``
    returns ``(geometry_for_spacing, feature)`` or None; features never overlap (40 m apart)."""
    inner = region.buffer(-PLACEMENT_INSET_M)
    minx, miny, maxx, maxy = inner.bounds
    inv = ~canvas.transform
    out = []
    for _ in range(n * tries_per_feature):
        if len(out) == n:
            break
        x, y = rng.uniform(minx, maxx), rng.uniform(miny, maxy)
        col, row = (int(v) for v in inv @ (x, y))
        if not accept(row, col, x, y):
            continue
        made = make(x, y, row, col)
        if made is None:
            continue
        geom, feature = made
        if not inner.contains(geom):
            continue
        spaced = geom.buffer(40.0)
        if any(spaced.intersects(o) for o in occupied):
            continue
        occupied.append(geom)
        out.append(feature)
    return out


def _build_scene(rng: np.random.Generator, canvas: _Grid, region: Polygon, years: tuple[int, ...], pool: list[Polygon] | None) -> _Scene:
    """Terrain, water, distractors and slumps (with their yearly growth) on the canvas."""
    # Each step below draws from ``rng`` in turn: their order fixes the region a seed gives.
    res = canvas.res
    area_km2 = region.area / 1e6
    elev, rivers, channels = _terrain(rng, canvas, region, n_rivers=max(1, int(round(np.sqrt(area_km2) / 2.5))))
    occupied: list[Polygon] = list(channels)
    relative = elev - _blur(elev, 200.0 / res)
    lakes = _place_lakes(rng, canvas, region, elev, relative, occupied)
    water_geoms = [*channels, *lakes]
    slope, ux, uy = _slope_and_upslope(elev, res)
    stabilised, slumps = _place_slumps(rng, canvas, region, years, pool, shapely.union_all(water_geoms), slope, ux, uy, occupied)
    ridges = _place_ridges(rng, canvas, region, relative, slope, occupied)
    _carve_features(rng, elev, canvas, years, slumps, stabilised, ridges)
    elev += 0.15 * _fractal(rng, canvas.shape, beta=1.0)  # micro-relief so hillshade is not glassy

    distractors: list[tuple[str, str, Polygon]] = [
        *((f"river_{i}", "river", c) for i, c in enumerate(channels)),
        *((f"lake_{i}", "lake", g) for i, g in enumerate(lakes)),
        *((f"stabilised_{i}", "stabilised_slump", p) for i, (_, p, _) in enumerate(stabilised)),
        *((f"ridge_{i}", "bare_ridge", g) for i, g in enumerate(ridges)),
    ]
    soft = lambda geoms, s=0.6: np.clip(_blur(_rasterize(geoms, canvas), s), 0, 1)  # noqa: E731
    return _Scene(
        canvas=canvas,
        region=region,
        elevation=elev,
        water=soft(water_geoms),
        ridges=soft(ridges, 1.0),
        stabilised=soft([p for _, p, _ in stabilised], 1.5),
        veg_texture=(_fractal(rng, canvas.shape, 2.2), _fractal(rng, canvas.shape, 2.8)),
        slumps=slumps,
        distractors=distractors,
        rivers=rivers,
    )


def _place_lakes(rng: np.random.Generator, canvas: _Grid, region: Polygon, elev: np.ndarray, relative: np.ndarray,
                 occupied: list[Polygon]) -> list[Polygon]:
    """Place lakes in hollows away from the rivers and flatten ``elev`` under each (in place)."""
    low = np.quantile(relative, 0.3)
    lakes = _place(
        rng, max(1, int(round(LAKES_PER_KM2 * (region.area / 1e6)))), region, canvas,
        accept=lambda r, c, x, y: relative[r, c] < low,
        make=lambda x, y, r, c: _same(_blob(rng, (x, y), rng.uniform(2e4, 1.2e5), rng.uniform(1.0, 1.8), 0.2)),
        occupied=occupied,
    )
    for lake in lakes:
        m = _rasterize([lake], canvas) > 0
        elev[m] = elev[m].min() - 0.5  # a lake's surface is flat
    return lakes


def _place_slumps(rng: np.random.Generator, canvas: _Grid, region: Polygon, years: tuple[int, ...], pool: list[Polygon] | None,
                  water_union, slope: np.ndarray, ux: np.ndarray, uy: np.ndarray,
                  occupied: list[Polygon]) -> tuple[list[tuple[str, Polygon, tuple[float, float]]], list[_Slump]]:
    """Place stabilised slumps, then active ones (first year, then new ones each later year)."""
    area_km2 = region.area / 1e6

    def on_slope(r: int, c: int, x: float, y: float, near_water_m: float = 450.0) -> bool:
        if not 3.0 <= slope[r, c] <= 25.0:
            return False
        d = water_union.distance(shapely.Point(x, y))
        # most slumps face valleys and lake shores; a few sit on open hillsides
        return d > 50.0 and (d < near_water_m or rng.random() < 0.15)

    def footprint(x: float, y: float, r: int, c: int, max_area: float = shp.MAX_AREA_M2) -> tuple[str, Polygon, tuple[float, float]]:
        up = (float(ux[r, c]), float(uy[r, c]))
        if pool:
            real = pool[int(rng.integers(len(pool)))]
            return "arts", shp.move_to(real, (x, y)), up
        kind = shp.SHAPE_KINDS[int(rng.integers(2))]
        local = shp.slump_outline(kind, float(shp.sample_areas(rng, 1, max_m2=max_area)[0]), float(shp.sample_elongations(rng, 1)[0]), rng)
        return kind, shp.place(local, (x, y), up), up

    def make_slump(first_year: int, max_area: float):
        def make(x, y, r, c):
            kind, poly, up = footprint(x, y, r, c, max_area)
            rate = rng.uniform(6.0, 25.0)  # headwall retreat, m/yr (Peel Plateau: ~5-30)
            fps = {first_year: poly}
            for prev, year in zip(years, years[1:]):
                if year > first_year:
                    fps[year] = shp.retreat(fps[prev], up, rate * (year - prev))
            return fps[years[-1]], _Slump("", kind, up, first_year, fps, rng.uniform(3.0, 8.0))
        return make

    # Stabilised slumps first (older, they can be anywhere an active one could), then active ones.
    stabilised = _place(
        rng, max(1, int(round(STABILISED_PER_KM2 * area_km2))), region, canvas, accept=on_slope,
        make=lambda x, y, r, c: _keyed(footprint(x, y, r, c, 40_000.0)),
        occupied=occupied,
    )
    slumps: list[_Slump] = _place(rng, max(3, int(round(ACTIVE_PER_KM2 * area_km2))), region, canvas, on_slope,
                                  make_slump(years[0], shp.MAX_AREA_M2), occupied)
    for year in years[1:]:
        slumps += _place(rng, max(1, int(round(NEW_PER_KM2_PER_YEAR * area_km2))), region, canvas, on_slope, make_slump(year, 15_000.0), occupied)
    for k, s in enumerate(slumps):
        s.slump_id = f"s{k + 1:03d}"
    return stabilised, slumps


def _place_ridges(rng: np.random.Generator, canvas: _Grid, region: Polygon, relative: np.ndarray, slope: np.ndarray,
                  occupied: list[Polygon]) -> list[Polygon]:
    """Place bare ridges: convex hilltops (high relative elevation, gentle slope), no depression."""
    high = np.quantile(relative, 0.9)
    return _place(
        rng, max(1, int(round(RIDGES_PER_KM2 * (region.area / 1e6)))), region, canvas,
        accept=lambda r, c, x, y: relative[r, c] > high and slope[r, c] < 10.0,
        make=lambda x, y, r, c: _same(_blob(rng, (x, y), float(shp.sample_areas(rng, 1, 4_000.0, 40_000.0)[0]), rng.uniform(1.2, 2.5))),
        occupied=occupied,
    )


def _carve_features(rng: np.random.Generator, elev: np.ndarray, canvas: _Grid, years: tuple[int, ...], slumps: list[_Slump],
                    stabilised: list[tuple[str, Polygon, tuple[float, float]]], ridges: list[Polygon]) -> None:
    """Carve slump scars and raise ridge domes in ``elev`` (in place), as the DEM year shows them."""
    # Active slumps as they were in the DEM year (the first year); stabilised slumps as shallower
    # scars with degraded, smooth headwalls.
    for s in slumps:
        if years[0] in s.footprints:
            _carve(elev, canvas, s.footprints[years[0]], s.upslope, s.depth_m, 4.0, rng)
    for _, poly, up in stabilised:
        _carve(elev, canvas, poly, up, rng.uniform(1.5, 4.0), 12.0, rng)
    if ridges:
        # wind-scoured knolls: gentle domes a couple of metres high, the opposite of a scar
        heights = rasterio.features.rasterize(
            [(g, rng.uniform(1.5, 3.0)) for g in ridges], out_shape=canvas.shape, transform=canvas.transform, dtype="float32"
        )
        elev += np.minimum(_blur(heights, 15.0 / canvas.res) * 1.5, heights.max())


# ------------------------------------------------------------------------------------------------
# Scenes per modality
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _OpticalPlan:
    """One optical acquisition: when, how cloudy, and whether it has a nodata strip."""

    item_id: str
    year: int
    when: dt.datetime
    cloud_target: float
    """Rough fraction of the scene under random clouds (before the slump-hiding ones)."""
    cover_fraction: float
    """Fraction of the year's slumps deliberately put under cloud."""
    nodata_strip: bool


def _optical_plans(rng: np.random.Generator, years: tuple[int, ...], area_km2: float) -> list[_OpticalPlan]:
    """1 item per year, 2 in every second year (one clear with a nodata strip, one cloudy)."""
    plans = []
    two_item_years = [y for k, y in enumerate(years) if k % 2 == 1]
    strip_year = two_item_years[0] if two_item_years else years[0]
    for year in years:
        d1 = dt.datetime(year, 7, 5, 20, 25, tzinfo=dt.timezone.utc) + dt.timedelta(days=int(rng.integers(0, 15)))
        if year in two_item_years:
            d2 = dt.datetime(year, 8, 2, 20, 25, tzinfo=dt.timezone.utc) + dt.timedelta(days=int(rng.integers(0, 20)))
            plans.append(_OpticalPlan(f"rtsmap-demo-s2-{d1:%Y%m%d}", year, d1, 0.04, 0.0, year == strip_year))
            plans.append(_OpticalPlan(f"rtsmap-demo-s2-{d2:%Y%m%d}", year, d2, 0.35, 0.35, False))
        else:
            plans.append(_OpticalPlan(f"rtsmap-demo-s2-{d1:%Y%m%d}", year, d1, 0.12, 0.15, year == strip_year))
    return plans


def _clouds(rng: np.random.Generator, scene: _Scene, plan: _OpticalPlan, covered: list[_Slump]) -> tuple[np.ndarray, np.ndarray]:
    """Cloud opacity and cloud-shadow strength on the canvas (both 0..1)."""
    canvas = scene.canvas
    x, y = canvas.xy()
    minx, miny, maxx, maxy = scene.region.bounds
    # a blob of radius r covers ~pi * (1.2 r)**2, about 0.23 km2 for the mean r of 225 m
    n_blobs = max(1, int(round(plan.cloud_target * scene.region.area / 0.23e6)))
    centers = [(rng.uniform(minx, maxx), rng.uniform(miny, maxy), rng.uniform(100, 350), 1.0) for _ in range(n_blobs)]
    for s in covered:  # a thick blob centred on the slump hides it completely
        c = s.footprints[plan.year].centroid
        extent = np.sqrt(s.footprints[plan.year].area)
        centers.append((c.x, c.y, max(100.0, 1.2 * extent), 1.8))
    field_ = np.zeros(canvas.shape, np.float32)
    for cx, cy, r, amp in centers:
        field_ = np.maximum(field_, amp * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r)).astype(np.float32))
    fluff = 0.75 + 0.25 * np.clip(_fractal(rng, canvas.shape, 2.6) / 2.0, -1, 1)
    alpha = _smoothstep(0.25, 0.55, field_ * fluff).astype(np.float32)
    # the shadow is the cloud moved away from the sun (low sun in the south-east)
    dr, dc = (int(round(v / canvas.res)) for v in (-160.0, -120.0))
    shadow = np.zeros_like(alpha)
    h, w = alpha.shape
    shadow[max(dr, 0):h + min(dr, 0), max(dc, 0):w + min(dc, 0)] = alpha[max(-dr, 0):h + min(-dr, 0), max(-dc, 0):w + min(-dc, 0)]
    return alpha, shadow * (1.0 - alpha)


def _slump_layer(scene: _Scene, year: int) -> np.ndarray:
    """Fraction of each canvas pixel inside an active slump in ``year``."""
    polys = [s.footprints[year] for s in scene.slumps if year in s.footprints]
    return np.clip(_blur(_rasterize(polys, scene.canvas), 0.6), 0, 1)


def _render_optical(rng: np.random.Generator, scene: _Scene, slumps_now: np.ndarray, alpha: np.ndarray, shadow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surface reflectance [4, H, W] (0..1) and SCL classes [H, W] on the canvas."""
    t1, t2 = scene.veg_texture
    shape = scene.canvas.shape
    bright = rng.uniform(0.95, 1.05)
    # tundra: NDVI ~0.65-0.8; stabilised scars carry shrubs (even greener)
    veg_nir = 0.29 + 0.025 * t1 + 0.03 * scene.stabilised
    veg_red = 0.042 + 0.006 * t2 - 0.006 * scene.stabilised
    veg = np.stack([0.032 + 0.004 * t2, 0.062 + 0.006 * t1, veg_red, veg_nir])
    noise = rng.standard_normal(shape).astype(np.float32)
    bare = np.stack([0.095 + 0.008 * noise, 0.125 + 0.01 * noise, 0.155 + 0.012 * noise, 0.205 + 0.012 * noise])
    water = np.array([0.05, 0.045, 0.03, 0.012], np.float32)[:, None, None]
    b = np.clip(np.maximum(slumps_now * 0.95, scene.ridges * 0.9), 0, 1)
    w = scene.water
    surface = (1 - w) * ((1 - b) * veg + b * bare) + w * water
    surface *= 1.0 - 0.65 * shadow
    cloud = np.array([0.52, 0.53, 0.55, 0.58], np.float32)[:, None, None] * (1 + 0.05 * t2)
    refl = (1 - alpha) * surface + alpha * cloud
    refl = refl * bright + 0.002 * rng.standard_normal(refl.shape).astype(np.float32)
    ndvi = (refl[3] - refl[2]) / (refl[3] + refl[2] + 1e-6)
    scl = np.full(shape, SCL_VEGETATION, np.uint8)
    scl[ndvi < 0.35] = SCL_BARE
    scl[w > 0.5] = SCL_WATER
    scl[(shadow > 0.3) & (alpha < 0.12)] = SCL_SHADOW
    scl[(alpha >= 0.12) & (alpha < 0.3)] = SCL_CIRRUS
    scl[(alpha >= 0.3) & (alpha < 0.6)] = SCL_CLOUD_MEDIUM
    scl[alpha >= 0.6] = SCL_CLOUD_HIGH
    return refl.astype(np.float32), scl


# ------------------------------------------------------------------------------------------------
# SAR: Sentinel-1 RTC-like gamma0. Every number is in SarModel; docs/synthetic-sar.md gives the
# sources and what is a modelling choice.
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SarModel:
    """The parameters of the synthetic Sentinel-1 RTC scenes (sources: docs/synthetic-sar.md)."""

    looks: float = 4.4
    """Equivalent number of looks of the speckle per product pixel (IW GRDH: 4.4)."""
    incidence_deg: float = 38.0
    """Incidence angle on a flat ellipsoid at the region (IW swath: about 29-46 degrees)."""
    look_azimuth_deg: float = 293.0
    """Azimuth (clockwise from true north) the radar looks towards: right-looking on a descending
    pass (ground-track heading about 203 degrees at 67 N), i.e. towards the west-north-west."""
    terrain_exponent: float = 0.5
    """Residual terrain modulation after RTC flattening: gamma0 times (cos local / cos flat)**this."""
    layover_gain_db: float = 6.0
    """Added to gamma0 where the terrain facing the radar is steeper than the incidence angle."""
    shadow_db: float = -25.0
    """gamma0 where the terrain facing away is steeper than 90 degrees minus the incidence angle:
    no signal, only the noise level (below the -22 dB NESZ the IW mode is specified to)."""
    tundra_db: tuple[float, float] = (-13.5, -20.5)
    """VV, VH gamma0 of shrub tundra (before texture, moisture and terrain)."""
    texture_db: float = 0.8
    """Standard deviation of the tundra's own spatial texture."""
    ridge_db: tuple[float, float] = (-12.5, -20.0)
    """VV, VH gamma0 of bare, wind-scoured ridge tops."""
    water_db: tuple[float, float] = (-23.0, -29.0)
    """VV, VH gamma0 of calm open water."""
    contrast_vv_db: tuple[float, float] = (-1.0, 3.0)
    """Range of the per-slump VV contrast (scar floor minus surrounding tundra), drawn uniformly:
    a quarter of the slumps lie within 0.5 dB of their surroundings, i.e. invisible in SAR."""
    contrast_vh_minus_vv_db: tuple[float, float] = (-1.5, 0.5)
    """Range of the per-slump VH contrast minus the VV contrast (bare ground loses the shrubs'
    volume scattering, which carries VH more than VV)."""
    scene_offset_std_db: float = 0.5
    """Standard deviation of one scene-wide offset per year (moisture after rain, calibration)."""
    moisture_std_db: float = 1.0
    """Standard deviation of the per-year, spatially smooth soil-moisture offset field."""
    moisture_length_m: float = 400.0
    """Correlation length (Gaussian sigma) of the soil-moisture field."""
    wet_snow_db: float = -3.0
    """Offset on late-lying wet snow patches (the usual C-band wet-snow threshold)."""
    wet_snow_fraction: float = 0.02
    """Share of the canvas under wet snow patches in a year's scene."""
    wet_snow_length_m: float = 60.0
    """Correlation length (Gaussian sigma) of the field whose top share is wet snow."""


SAR_MODEL = SarModel()
"""The SAR parameters every demo region is generated with."""

_SAR_CONTRAST_STREAM = 0x5A12
"""Mixed into the seed of each slump's contrast draw, so that it is its own stream."""


def _db_to_linear(db) -> np.ndarray:
    """Decibels to linear power (float64)."""
    return np.power(10.0, np.asarray(db, dtype=np.float64) / 10.0)


def slump_sar_contrast_db(seed: int, slump_id: str, model: SarModel = SAR_MODEL) -> tuple[float, float]:
    """The VV and VH contrast (dB, scar floor minus surroundings) a slump has in every SAR scene.

    Drawn from the slump's own stream (region seed and slump id), so it does not depend on the
    order slumps are drawn in and can be recomputed from the truth layer's ``slump_id``.

    Parameters
    ----------
    seed : int
        The region's seed.
    slump_id : str
        The slump's id (``slump_id`` in ``truth.gpkg``).
    model : SarModel
        The SAR parameters (the contrast ranges).

    Returns
    -------
    tuple of float
        VV and VH contrast in dB.
    """
    rng = np.random.default_rng([int(seed), _SAR_CONTRAST_STREAM, zlib.crc32(slump_id.encode())])
    vv = float(rng.uniform(*model.contrast_vv_db))
    return vv, vv + float(rng.uniform(*model.contrast_vh_minus_vv_db))


@dataclass(frozen=True)
class _SarGeometry:
    """What the terrain does to a SAR scene, per canvas pixel (the DEM does not change by year)."""

    range_slope_deg: np.ndarray
    """Slope along the look direction; positive where the terrain faces the radar."""
    terrain: np.ndarray
    """Residual terrain factor of RTC gamma0 (1 on flat ground)."""
    layover: np.ndarray
    """Facing slope steeper than the incidence angle."""
    shadow: np.ndarray
    """Slope facing away steeper than 90 degrees minus the incidence angle."""


def _look_vector(crs: str, center_xy: tuple[float, float], azimuth_deg: float) -> tuple[float, float]:
    """Unit vector, in map coordinates of ``crs``, of the horizontal direction the radar looks in.

    The grid's north is not map-up in polar stereographic, so true north is measured at the centre.
    """
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    to_map = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    lon, lat = to_ll.transform(*center_xy)
    nx, ny = np.subtract(to_map.transform(lon, lat + 0.01), center_xy)
    n = np.array([nx, ny]) / np.hypot(nx, ny)
    e = np.array([n[1], -n[0]])  # a conformal map keeps east 90 degrees clockwise of north
    a = np.radians(azimuth_deg)
    v = np.sin(a) * e + np.cos(a) * n
    return float(v[0]), float(v[1])


def _sar_geometry(elevation: np.ndarray, res: float, look_xy: tuple[float, float], model: SarModel = SAR_MODEL) -> _SarGeometry:
    """Local layover, shadow and the residual terrain factor from a DEM (rows run southward).

    Only the local slope is looked at: passive shadow and layover (cast by terrain further along
    the range) are left out; relief of tens of metres over hundreds makes them a pixel or two.
    """
    drow, dcol = np.gradient(elevation.astype(np.float64), res)
    gx, gy = dcol, -drow  # map y grows northward, rows southward
    along = gx * look_xy[0] + gy * look_xy[1]  # > 0: rises away from the radar, faces it
    range_slope = np.degrees(np.arctan(along))
    inc = np.radians(model.incidence_deg)
    # cosine of the local incidence angle: normal (-gx, -gy, 1) against the direction to the radar
    cos_local = (np.sin(inc) * along + np.cos(inc)) / np.sqrt(gx**2 + gy**2 + 1.0)
    terrain = np.clip(cos_local / np.cos(inc), 0.1, None) ** model.terrain_exponent
    layover = range_slope > model.incidence_deg
    shadow = range_slope < -(90.0 - model.incidence_deg)
    return _SarGeometry(range_slope.astype(np.float32), terrain.astype(np.float32), layover, shadow)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field: white noise blurred by a Gaussian of ``sigma_px``.

    Filtered in the frequency domain without padding: a field that wraps around at the edges is
    still a stationary random field, and skipping :func:`_blur`'s padding keeps it cheap.
    """
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fx**2 + fy**2))
    f = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * kernel, s=shape)
    f -= f.mean()
    return (f / (f.std() + 1e-12)).astype(np.float32)


def _moisture_offset_db(rng: np.random.Generator, canvas: _Grid, model: SarModel = SAR_MODEL) -> np.ndarray:
    """One year's spatially smooth dB offset of land on ``canvas``: soil moisture and wet snow.

    Drawn on a grid 4 times coarser and resampled: both fields are smooth over several coarse
    pixels, and the full canvas would cost two large FFTs a year.
    """
    k = 4
    coarse = _Grid(canvas.crs, canvas.transform @ Affine.scale(float(k)), (canvas.shape[0] // k + 2, canvas.shape[1] // k + 2))
    moisture = model.moisture_std_db * _smooth_field(rng, coarse.shape, model.moisture_length_m / coarse.res)
    snow_field = _smooth_field(rng, coarse.shape, model.wet_snow_length_m / coarse.res)
    edge = np.quantile(snow_field, 1.0 - model.wet_snow_fraction)
    snow = _smoothstep(edge - 0.15, edge + 0.15, snow_field)  # soft-edged patches
    return _resample(moisture + model.wet_snow_db * snow, coarse, canvas, Resampling.bilinear)


def _slump_gain(scene: _Scene, year: int, contrasts: dict[str, tuple[float, float]], slumps_now: np.ndarray) -> np.ndarray:
    """Linear gain [2, H, W] of each band: 1 off slumps, the slump's contrast on its floor.

    ``slumps_now`` is the soft slump fraction (:func:`_slump_layer`); slumps lie 40 m apart, so
    each soft edge belongs to one slump, found by rasterizing its footprint a few pixels wider.
    """
    now = [s for s in scene.slumps if year in s.footprints]
    if not now:
        return np.ones((2, *scene.canvas.shape), np.float32)
    grow = 3.0 * scene.canvas.res  # beyond the soft edge of _slump_layer's blur
    index = rasterio.features.rasterize(
        [(s.footprints[year].buffer(grow), k + 1) for k, s in enumerate(now)],
        out_shape=scene.canvas.shape, transform=scene.canvas.transform, dtype="int32",
    )
    excess = np.zeros((2, len(now) + 1), np.float32)  # index 0: no slump, gain 1
    excess[:, 1:] = np.array([_db_to_linear(contrasts[s.slump_id]) - 1.0 for s in now]).T
    return (1.0 + slumps_now[None] * excess[:, index]).astype(np.float32)


def _render_sar(scene: _Scene, gain: np.ndarray, geometry: _SarGeometry, offset_db: np.ndarray, model: SarModel = SAR_MODEL) -> np.ndarray:
    """Noise-free gamma0 [2, H, W] (linear) on the canvas.

    Land cover (tundra with texture, bare ridges, slump floors at their own contrast) times the
    year's moisture offset and the residual terrain factor; water flat; layover bright; shadow at
    the noise level.
    """
    t1, _ = scene.veg_texture
    # the per-pixel powers of ten once for both bands (float32: this runs on the whole canvas)
    texture = _db_to_linear(model.texture_db * t1).astype(np.float32)
    common = (_db_to_linear(offset_db) * geometry.terrain).astype(np.float32)
    bands = []
    for b in range(2):
        tundra = np.float32(_db_to_linear(model.tundra_db[b])) * texture
        ridge = np.float32(_db_to_linear(model.ridge_db[b]))
        land = ((1 - scene.ridges) * tundra + scene.ridges * ridge) * gain[b] * common
        g = (1 - scene.water) * land + scene.water * np.float32(_db_to_linear(model.water_db[b]))
        g = np.where(geometry.layover, g * np.float32(_db_to_linear(model.layover_gain_db)), g)
        bands.append(np.where(geometry.shadow, np.float32(_db_to_linear(model.shadow_db)), g))
    return np.stack(bands).astype(np.float32)


SAR_VARIANTS = ("realistic", "legacy")
"""``realistic``: :class:`SarModel` (the default). ``legacy``: the first generator's SAR (every
slump a +5 dB floor, terrain looking east, one 0.4 dB offset a year), kept because the shipped
demo model was trained on it: ``rtsmap demo`` and the tests that score that model use it, until
the demo model is retrained on the realistic SAR."""


def _render_sar_legacy(rng: np.random.Generator, scene: _Scene, slumps_now: np.ndarray) -> np.ndarray:
    """The first generator's noise-free gamma0 [2, H, W] (linear): see :data:`SAR_VARIANTS`."""
    drow, dcol = np.gradient(scene.elevation, scene.canvas.res)
    norm = np.sqrt(dcol**2 + drow**2 + 1)
    inc = np.radians(38.0)
    cos_local = (-dcol * -np.sin(inc) + np.cos(inc)) / norm  # a sensor looking east (+x)
    terrain = np.clip(cos_local / np.cos(inc), 0.1, 3.0) ** 1.2
    t1, _ = scene.veg_texture
    offset = rng.normal(0, 0.4)
    tundra = np.stack([_db_to_linear(-13.5 + 0.8 * t1 + offset), _db_to_linear(-20.5 + 0.8 * t1 + offset)])
    floor = np.stack([np.full_like(t1, _db_to_linear(-8.5 + offset)), np.full_like(t1, _db_to_linear(-15.5 + offset))])
    ridge = np.stack([np.full_like(t1, _db_to_linear(-12.5 + offset)), np.full_like(t1, _db_to_linear(-20.0 + offset))])
    water = np.array([_db_to_linear(-23.0), _db_to_linear(-29.0)], np.float32)[:, None, None]
    land = (1 - slumps_now) * ((1 - scene.ridges) * tundra + scene.ridges * ridge) + slumps_now * floor
    return ((1 - scene.water) * land * terrain + scene.water * water).astype(np.float32)


def _speckle(rng: np.random.Generator, gamma0: np.ndarray, looks: float) -> np.ndarray:
    """Multiplicative speckle: unit-mean gamma with shape ``looks`` (multi-look intensity)."""
    return gamma0 * rng.gamma(looks, 1.0 / looks, size=gamma0.shape)


# ------------------------------------------------------------------------------------------------
# STAC
# ------------------------------------------------------------------------------------------------


def _item(item_id: str, collection: str, when: dt.datetime, grid: _Grid, assets: dict[str, Path], props: dict) -> pystac.Item:
    footprint = _to_crs(grid.footprint(), grid.crs, "EPSG:4326", densify_m=10 * grid.res)
    item = pystac.Item(item_id, mapping(footprint), list(footprint.bounds), when, dict(props), collection=collection)
    for key, path in assets.items():
        item.add_asset(key, pystac.Asset(str(path), title=key, media_type=pystac.MediaType.COG, roles=["data"]))
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.code = grid.crs
    proj.shape = list(grid.shape)
    proj.transform = list(grid.transform)[:6]
    # older readers (odc-stac < 0.4, some STAC APIs) look for proj:epsg only
    item.properties["proj:epsg"] = int(grid.crs.split(":")[1])
    return item


def _collection(cid: str, description: str, items: list[pystac.Item]) -> pystac.Collection:
    bboxes = np.array([i.bbox for i in items])
    times = sorted(i.datetime for i in items)
    extent = pystac.Extent(
        pystac.SpatialExtent([[*bboxes[:, :2].min(0), *bboxes[:, 2:].max(0)]]),
        pystac.TemporalExtent([[times[0], times[-1]]]),
    )
    return pystac.Collection(cid, description, extent, license="CC0-1.0", title=cid)


def _write_stac(stac_dir: Path, by_collection: dict[str, tuple[str, list[pystac.Item]]]) -> tuple[Path, Path, Path, tuple[Path, ...]]:
    stac_dir.mkdir(parents=True, exist_ok=True)
    all_items = sorted((i for _, items in by_collection.values() for i in items), key=lambda i: i.id)
    items_path = stac_dir / "items.json"
    items_path.write_text(json.dumps(pystac.ItemCollection([i.clone() for i in all_items]).to_dict(), indent=1))
    ndjson_path = stac_dir / "items.ndjson"
    ndjson_path.write_text("".join(json.dumps(i.to_dict(include_self_link=False)) + "\n" for i in all_items))

    catalog = pystac.Catalog("rtsmap-demo", "Synthetic multimodal demo region for rtsmap (Peel Plateau-like)", title="rtsmap demo")
    coll_paths = []
    (stac_dir / "collections").mkdir(exist_ok=True)
    for cid, (description, items) in by_collection.items():
        coll = _collection(cid, description, items)
        standalone = coll.to_dict(include_self_link=False)
        standalone["links"] = []
        path = stac_dir / "collections" / f"{cid}.json"
        path.write_text(json.dumps(standalone, indent=1))
        coll_paths.append(path)
        for i in items:
            coll.add_item(i.clone())
        catalog.add_child(coll)
    catalog.normalize_hrefs(str(stac_dir))
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    return items_path, ndjson_path, stac_dir / "catalog.json", tuple(coll_paths)


# ------------------------------------------------------------------------------------------------
# The region
# ------------------------------------------------------------------------------------------------


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before anything is deleted, an output that is a file, a foreign folder, or an earlier
    region without ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file; give a new or empty directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{out}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"{out}: the directory {parent} is not writable")
            break
    if out.is_dir() and any(out.iterdir()):
        if not (out / "region.json").exists():
            raise OutputError(f"{out} exists and is not an rtsmap demo region (no region.json); give an empty or new directory")
        if not overwrite:
            raise OutputError(f"{out} already holds a demo region; pass --overwrite to replace it, or give a new directory")


def _prepare_out_dir(out: Path) -> None:
    """Remove an earlier demo region's files (call only after every check has passed)."""
    if out.exists() and any(out.iterdir()):
        for name in ("cogs", "stac"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("aoi.geojson", "truth.gpkg", "region.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _check_arguments(seed: int, years, size_m, center_lonlat, fine_resolution: float, sar: str) -> tuple[int, ...]:
    """Check every argument of :func:`generate_region` but the paths; return the years as ints."""
    if sar not in SAR_VARIANTS:
        raise ConfigError(f"sar must be one of {', '.join(SAR_VARIANTS)}, got {sar!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        years = tuple(int(y) for y in years)
    except (TypeError, ValueError):
        raise ConfigError(f"years must be integers, got {years!r}") from None
    if not years or any(b <= a for a, b in zip(years, years[1:])):
        raise ConfigError(f"years must be a non-empty, strictly increasing list, got {years}")
    if years[0] < MIN_YEAR or years[-1] > MAX_YEAR or len(years) > MAX_YEARS:
        raise ConfigError(f"years must lie in {MIN_YEAR}-{MAX_YEAR}, at most {MAX_YEARS} of them, got "
                          f"{years[0]}..{years[-1]} ({len(years)} years)")
    if len(size_m) != 2 or not all(math.isfinite(float(v)) for v in size_m):
        raise ConfigError(f"region size must be two finite numbers of metres, got {size_m!r}")
    if min(size_m) < 1000.0 or max(size_m) > 50_000.0:
        raise ConfigError(f"region size must be 1-50 km per side, got {size_m[0] / 1000:g} x {size_m[1] / 1000:g} km")
    lon, lat = (float(v) for v in center_lonlat)
    if not (math.isfinite(lon) and math.isfinite(lat) and -180 <= lon <= 180 and 50 <= lat <= 85):
        raise ConfigError(f"centre must be a longitude in -180..180 and a latitude in 50..85, got {center_lonlat!r}")
    if not (math.isfinite(fine_resolution) and 0.5 <= fine_resolution <= DEM_RES):
        raise ConfigError(f"fine_resolution must be 0.5-{DEM_RES:g} m, got {fine_resolution!r}")
    return years


def _read_shapes_pool(shapes: str | Path | None) -> list[Polygon] | None:
    """Footprints of a ``--shapes`` file within the slump area limits (None without a file)."""
    if shapes is None:
        return None
    pool = [p for p in shp.read_footprints(shapes) if shp.MIN_AREA_M2 <= p.area <= shp.MAX_AREA_M2]
    if not pool:
        raise ConfigError(f"--shapes file {shapes} has no footprints between {shp.MIN_AREA_M2:g} and {shp.MAX_AREA_M2:g} m2")
    return pool


def _region_grids(center_lonlat: tuple[float, float], size_m: tuple[float, float],
                  fine_resolution: float) -> tuple[tuple[float, float], Polygon, dict[str, _Grid], _Grid]:
    """The region square in EPSG:3413 (snapped to 10 m), its centre, the native grids and the canvas."""
    cx, cy = Transformer.from_crs("EPSG:4326", DEM_CRS, always_xy=True).transform(*center_lonlat)
    cx, cy = round(cx / DEM_RES) * DEM_RES, round(cy / DEM_RES) * DEM_RES
    w, h = (round(v / 2 / DEM_RES) * DEM_RES for v in size_m)
    region = box(cx - w, cy - h, cx + w, cy + h)
    padded = region.buffer(NATIVE_PAD_M, join_style="mitre")
    grids = {
        "dem": _snapped_grid(padded.bounds, DEM_CRS, DEM_RES),
        "optical": _snapped_grid(_to_crs(padded, DEM_CRS, OPTICAL_CRS).bounds, OPTICAL_CRS, OPTICAL_RES),
        "sar": _snapped_grid(_to_crs(padded, DEM_CRS, SAR_CRS).bounds, SAR_CRS, SAR_RES),
    }
    # The canvas covers every native grid's footprint, so no native pixel is left empty.
    reach = shapely.union_all([_to_crs(g.footprint(), g.crs, DEM_CRS) for g in grids.values()])
    canvas = _snapped_grid(reach.buffer(4 * fine_resolution).bounds, DEM_CRS, fine_resolution)
    return (cx, cy), region, grids, canvas


def _write_dem(scene: _Scene, grid: _Grid, cogs: Path, dem_year: int) -> pystac.Item:
    """Write the DEM (one snapshot, taken in ``dem_year``) as a COG; return its STAC item."""
    dem = _resample(scene.elevation, scene.canvas, grid, Resampling.average)
    dem = np.where(np.isnan(dem), DEM_NODATA, dem).astype(np.float32)
    dem_id = "rtsmap-demo-dem-10m"
    dem_path = cogs / DEM_COLLECTION / dem_id / "dem.tif"
    _write_cog(dem_path, dem, grid, DEM_NODATA, "AVERAGE")
    return _item(dem_id, DEM_COLLECTION, dt.datetime(dem_year, 7, 1, tzinfo=dt.timezone.utc), grid, {"dem": dem_path},
                 {"platform": "synthetic", "rtsmap:synthetic": True})


def _write_optical_year(rng_clouds: np.random.Generator, rng_optical: np.random.Generator, scene: _Scene, year: int,
                        plans: list[_OpticalPlan], slumps_now: np.ndarray, grid: _Grid, cogs: Path,
                        cloud_alpha: dict[str, np.ndarray]) -> list[pystac.Item]:
    """Write the optical scenes of one year; record each scene's cloud opacity in ``cloud_alpha``."""
    present = [s for s in scene.slumps if year in s.footprints]
    year_plans = [p for p in plans if p.year == year]
    # The same slumps are hidden in every scene of a single-scene year; in a two-scene year,
    # the cloudy scene hides some and the clear one shows them, so best-first mosaicking matters.
    n_cover = max(1, int(round(max(p.cover_fraction for p in year_plans) * len(present))))
    hidden = [present[i] for i in sorted(rng_clouds.choice(len(present), size=min(n_cover, len(present)), replace=False))]
    items = []
    for plan in year_plans:
        covered = hidden if plan.cover_fraction > 0 else []
        alpha, shadow = _clouds(rng_clouds, scene, plan, covered)
        cloud_alpha[plan.item_id] = alpha
        refl, scl = _render_optical(rng_optical, scene, slumps_now, alpha, shadow)
        items.append(_write_optical_scene(plan, refl, scl, scene.canvas, grid, cogs))
    return items


def _write_optical_scene(plan: _OpticalPlan, refl: np.ndarray, scl: np.ndarray, canvas: _Grid, grid: _Grid,
                         cogs: Path) -> pystac.Item:
    """Resample one rendered optical scene to its native grid, write its COGs; return its item."""
    bands = [_resample(refl[k], canvas, grid, Resampling.average) for k in range(4)]
    scl_n = _resample(scl.astype(np.float32), canvas, grid, Resampling.mode)
    valid = ~np.isnan(scl_n)
    if plan.nodata_strip:  # the swath edge: the eastern 12 % of the scene has no data
        valid[:, int(grid.shape[1] * 0.88):] = False
    scl_out = np.where(valid, np.nan_to_num(scl_n), SCL_NODATA).astype(np.uint8)
    paths = {}
    for name, band in zip(OPTICAL_BANDS, bands):
        dn = np.where(valid, np.clip(np.round(np.nan_to_num(band) * 10000), 1, 65535), 0).astype(np.uint16)
        paths[name] = cogs / OPTICAL_COLLECTION / plan.item_id / f"{name}.tif"
        _write_cog(paths[name], dn, grid, 0, "AVERAGE")
    paths["scl"] = cogs / OPTICAL_COLLECTION / plan.item_id / "scl.tif"
    _write_cog(paths["scl"], scl_out, grid, SCL_NODATA, "NEAREST")
    n_valid = max(int(valid.sum()), 1)
    cloud_cover = 100.0 * np.isin(scl_out, (SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_CIRRUS)).sum() / n_valid
    item = _item(plan.item_id, OPTICAL_COLLECTION, plan.when, grid, paths,
                 {"platform": "sentinel-2a", "constellation": "sentinel-2", "rtsmap:synthetic": True})
    EOExtension.ext(item, add_if_missing=True).cloud_cover = round(float(cloud_cover), 2)
    return item


def _write_sar_year(rng_sar: np.random.Generator, rng_sar_fields: np.random.Generator, scene: _Scene, year: int, sar: str,
                    slumps_now: np.ndarray, contrasts: dict[str, tuple[float, float]], sar_geometry: _SarGeometry,
                    grid: _Grid, cogs: Path) -> pystac.Item:
    """Write the SAR scene of one year (noise-free gamma0 averaged to 20 m, then speckle); return its item."""
    # rng_sar is drawn in the order it always was (date, scene offset, speckle per band), so the
    # acquisition dates (the item ids) stay those of earlier regions; the new fields come from
    # rng_sar_fields.
    canvas = scene.canvas
    when = dt.datetime(year, 7, 18, 15, 40, tzinfo=dt.timezone.utc) + dt.timedelta(days=int(rng_sar.integers(0, 20)))
    sar_id = f"rtsmap-demo-s1-{when:%Y%m%d}"
    if sar == "legacy":  # the same rng_sar draws in the same order as the realistic branch
        gamma0 = _render_sar_legacy(rng_sar, scene, slumps_now)
    else:
        offset_db = _moisture_offset_db(rng_sar_fields, canvas)
        offset_db += rng_sar.normal(0.0, SAR_MODEL.scene_offset_std_db)
        gamma0 = _render_sar(scene, _slump_gain(scene, year, contrasts, slumps_now), sar_geometry, offset_db)
    paths = {}
    for k, name in enumerate(SAR_BANDS):
        g = _speckle(rng_sar, _resample(gamma0[k], canvas, grid, Resampling.average), SAR_MODEL.looks)
        g = np.where(np.isnan(g), 0.0, np.maximum(g, 1e-5)).astype(np.float32)
        paths[name] = cogs / SAR_COLLECTION / sar_id / f"{name}.tif"
        _write_cog(paths[name], g, grid, 0.0, "AVERAGE")
    return _item(sar_id, SAR_COLLECTION, when, grid, paths,
                 {"platform": "sentinel-1a", "constellation": "sentinel-1", "sar:polarizations": ["VV", "VH"], "rtsmap:synthetic": True})


def _write_aoi(path: Path, region: Polygon, seed: int) -> None:
    """Write the AOI (the region square shrunk by ``AOI_INSET_M``) as GeoJSON in EPSG:4326."""
    aoi = _to_crs(region.buffer(-AOI_INSET_M, join_style="mitre"), DEM_CRS, "EPSG:4326", densify_m=100.0)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"name": REGION_NAME, "seed": seed}, "geometry": mapping(aoi)}]}, indent=1))


def _write_region_json(path: Path, *, seed: int, years: tuple[int, ...], size_m, center_lonlat, region: Polygon,
                       fine_resolution: float, sar: str, shapes: str | Path | None, grids: dict[str, _Grid],
                       items: dict[str, list[pystac.Item]], counts: dict) -> None:
    """Write ``region.json``: what was generated (seed, years, sizes, CRSs, counts, item ids)."""
    path.write_text(json.dumps({
        "generator": "rtsmap demo_region",
        "name": REGION_NAME,
        "seed": seed,
        "years": list(years),
        "size_m": [float(v) for v in size_m],
        "center_lonlat": list(center_lonlat),
        "bounds_3413": list(region.bounds),
        "fine_resolution": fine_resolution,
        "sar": sar,
        "shapes": str(Path(shapes).resolve()) if shapes is not None else None,
        "dem_year": years[0],
        "grids": {k: {"crs": g.crs, "resolution": g.res, "shape": list(g.shape), "transform": list(g.transform)[:6]} for k, g in grids.items()},
        "collections": {c: [i.id for i in v] for c, v in items.items()},
        "counts": counts,
    }, indent=1))


def generate_region(
    out_dir: str | Path,
    *,
    seed: int = 0,
    years: tuple[int, ...] = (2021, 2022, 2023),
    size_m: tuple[float, float] = (6000.0, 6000.0),
    shapes: str | Path | None = None,
    center_lonlat: tuple[float, float] = REGION_CENTER_LONLAT,
    fine_resolution: float = 5.0,
    overwrite: bool = False,
    sar: str = "realistic",
) -> DemoRegion:
    """Generate the synthetic demo region (rasters, truth, STAC) under ``out_dir``.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        Output directory: new, empty, or an earlier demo region (replaced only with
        ``overwrite``; every argument is checked before any of its files is removed).
    seed : int
        Seed; the same seed gives the same truth and the same pixels.
    years : tuple of int
        Years with optical and SAR scenes and a truth layer each (strictly increasing).
    size_m : tuple of float
        Width and height of the region in metres (EPSG:3413), at least 1000 each.
    shapes : str or pathlib.Path, optional
        An ARTS-schema vector file; its footprints (translated, shape and size kept) replace the
        synthetic teardrop/horseshoe outlines.
    center_lonlat : tuple of float
        Centre of the region (longitude, latitude). Must stay within reach of UTM zones 8N and 9N.
    fine_resolution : float
        Pixel size of the EPSG:3413 canvas the scene is drawn on before resampling to each
        native grid (finer than every native grid).
    overwrite : bool
        Replace an earlier demo region in ``out_dir``.
    sar : str
        The SAR synthesis, one of :data:`SAR_VARIANTS`: ``realistic`` (:class:`SarModel`) or
        ``legacy`` (the first generator's, far too easy; what the first demo model was trained on).

    Returns
    -------
    DemoRegion
        Paths of what was written.

    Raises
    ------
    ConfigError
        If the seed, years, size, centre, resolution or the shapes file are unusable.
    OutputError
        If ``out_dir`` is a file, a non-empty directory that is not a demo region, or an
        earlier demo region and ``overwrite`` is False.
    """
    # Every check comes before _prepare_out_dir: a bad argument never costs an existing region.
    years = _check_arguments(seed, years, size_m, center_lonlat, fine_resolution, sar)
    out = Path(out_dir).resolve()
    _check_out_dir(out, overwrite)
    pool = _read_shapes_pool(shapes)
    _prepare_out_dir(out)

    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]
    rng_scene, rng_plan, rng_clouds, rng_optical, rng_sar, rng_sar_fields = rngs
    center, region, grids, canvas = _region_grids(center_lonlat, size_m, fine_resolution)
    scene = _build_scene(rng_scene, canvas, region, years, pool)
    cogs = out / "cogs"
    items: dict[str, list[pystac.Item]] = {OPTICAL_COLLECTION: [], SAR_COLLECTION: [], DEM_COLLECTION: []}
    items[DEM_COLLECTION].append(_write_dem(scene, grids["dem"], cogs, years[0]))

    # Optical and SAR, year by year. The SAR geometry comes from the (static) terrain; each slump
    # keeps its own SAR contrast in every year.
    plans = _optical_plans(rng_plan, years, region.area / 1e6)
    sar_geometry = _sar_geometry(scene.elevation, canvas.res, _look_vector(DEM_CRS, center, SAR_MODEL.look_azimuth_deg))
    contrasts = {s.slump_id: slump_sar_contrast_db(seed, s.slump_id) for s in scene.slumps}
    cloud_alpha: dict[str, np.ndarray] = {}
    for year in years:
        slumps_now = _slump_layer(scene, year)
        items[OPTICAL_COLLECTION] += _write_optical_year(rng_clouds, rng_optical, scene, year, plans, slumps_now,
                                                         grids["optical"], cogs, cloud_alpha)
        items[SAR_COLLECTION].append(_write_sar_year(rng_sar, rng_sar_fields, scene, year, sar, slumps_now, contrasts,
                                                     sar_geometry, grids["sar"], cogs))

    truth_path = out / "truth.gpkg"
    counts = _write_truth(truth_path, scene, years, plans, cloud_alpha, seed)
    aoi_path = out / "aoi.geojson"
    _write_aoi(aoi_path, region, seed)
    items_path, ndjson_path, catalog_path, coll_paths = _write_stac(out / "stac", {
        OPTICAL_COLLECTION: ("Synthetic Sentinel-2 L2A-like surface reflectance (UTM 8N, 10 m)", items[OPTICAL_COLLECTION]),
        SAR_COLLECTION: ("Synthetic Sentinel-1 RTC-like gamma0 (UTM 9N, 20 m)", items[SAR_COLLECTION]),
        DEM_COLLECTION: ("Synthetic ArcticDEM-like elevation (EPSG:3413, 10 m)", items[DEM_COLLECTION]),
    })
    region_path = out / "region.json"
    _write_region_json(region_path, seed=seed, years=years, size_m=size_m, center_lonlat=center_lonlat, region=region,
                       fine_resolution=fine_resolution, sar=sar, shapes=shapes, grids=grids, items=items, counts=counts)
    return DemoRegion(out, aoi_path, truth_path, items_path, ndjson_path, catalog_path, coll_paths, region_path, years, seed)


def _write_truth(path: Path, scene: _Scene, years: tuple[int, ...], plans: list[_OpticalPlan], cloud_alpha: dict[str, np.ndarray], seed: int) -> dict:
    """Write ``rts_<year>`` layers and a ``distractors`` layer; return counts for region.json."""
    import geopandas as gpd  # heavy; only needed here

    to_wgs84 = Transformer.from_crs(DEM_CRS, "EPSG:4326", always_xy=True)
    counts: dict = {"active_slumps": {}, "new_slumps": {}, "cloud_covered_slumps": {}}
    for year in years:
        rows = []
        year_items = [p.item_id for p in plans if p.year == year]
        for s in scene.slumps:
            if year not in s.footprints:
                continue
            poly = s.footprints[year]
            mask = _rasterize([poly], scene.canvas) > 0
            # share of the slump under cloud (opacity >= 0.3) in the clearest scene of the year
            cloud = min(float((cloud_alpha[i][mask] >= 0.3).mean()) for i in year_items)
            c = poly.centroid
            lon, lat = to_wgs84.transform(c.x, c.y)
            rows.append({
                "UID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"rtsmap-demo/{seed}/{s.slump_id}/{year}")),
                "slump_id": s.slump_id,
                "Year": year,
                "first_year": s.first_year,
                "shape_type": s.shape_type,
                "area_m2": round(float(poly.area), 2),
                "cloud_fraction": round(cloud, 3),
                "CentroidLat": round(lat, 5),
                "CentroidLon": round(lon, 5),
                "RegionName": REGION_NAME,
                "TrainClass": "Positive",
                "LabelType": "Polygon",
                "BaseMapSource": "synthetic",
                "geometry": poly,
            })
        gdf = gpd.GeoDataFrame(rows, geometry="geometry", crs=DEM_CRS)
        gdf.to_file(path, layer=f"rts_{year}", driver="GPKG")
        counts["active_slumps"][str(year)] = len(rows)
        counts["new_slumps"][str(year)] = sum(r["first_year"] == year for r in rows) if year != years[0] else 0
        counts["cloud_covered_slumps"][str(year)] = sum(r["cloud_fraction"] > 0.5 for r in rows)
    d = gpd.GeoDataFrame(
        [{"feature_id": fid, "class": cls, "area_m2": round(float(g.area), 2), "geometry": g} for fid, cls, g in scene.distractors],
        geometry="geometry", crs=DEM_CRS,
    )
    d.to_file(path, layer="distractors", driver="GPKG")
    for cls in ("lake", "river", "bare_ridge", "stabilised_slump"):
        counts[cls + "s"] = sum(c == cls for _, c, _ in scene.distractors)
    return counts


def _parse_years(text: str) -> tuple[int, ...]:
    """``2021-2023`` or ``2021,2023`` -> a tuple of years (the one year parser of every command)."""
    return tuple(parse_years(text, name="--years"))


@click.command("demo-data")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output directory (new, empty, or an earlier demo region).")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed; the same seed gives the same region.")
@click.option("--shapes", type=click.Path(dir_okay=False, path_type=Path), default=None, help="ARTS-schema GeoJSON/GPKG whose real footprints replace the synthetic ones.")
@click.option("--years", "years_text", default="2021-2023", show_default=True, help="Years, as a range (2021-2023) or a list (2021,2023).")
@click.option("--size-km", default=6.0, show_default=True, type=float, help="Side of the square region in km (1-50).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier demo region in --out.")
@click.option("--sar", type=click.Choice(SAR_VARIANTS), default="realistic", show_default=True,
              help="SAR synthesis: realistic (docs/synthetic-sar.md) or legacy (the first generator's, far too easy).")
def demo_data_command(out_dir: Path, seed: int, shapes: Path | None, years_text: str, size_km: float, overwrite: bool,
                      sar: str) -> None:
    """Generate the synthetic multimodal demo region (COGs, STAC, truth) into --out.

    Every option is checked before anything is written; an earlier region in --out is replaced
    only with --overwrite.
    """
    t0 = time.perf_counter()
    region = generate_region(out_dir, seed=seed, years=_parse_years(years_text),
                             size_m=(size_km * 1000.0, size_km * 1000.0), shapes=shapes, overwrite=overwrite, sar=sar)
    counts = json.loads(region.region_json.read_text())["counts"]
    click.echo(f"demo region written to {region.root} in {time.perf_counter() - t0:.1f} s")
    click.echo(f"  STAC items: {region.items}")
    click.echo(f"  AOI: {region.aoi}   truth: {region.truth}")
    click.echo("  active slumps per year: " + ", ".join(f"{y}: {n}" for y, n in counts["active_slumps"].items()))
    click.echo(f"  distractors: {counts['lakes']} lakes, {counts['rivers']} rivers, {counts['bare_ridges']} bare ridges, "
               f"{counts['stabilised_slumps']} stabilised slumps")
