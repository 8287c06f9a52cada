"""How well SAR alone tells slumps from background in a demo region, without training (docs/synthetic-sar.md).

For every true slump of every year, and for the same outline moved to random places that touch no
slump (of any year) and no water, two numbers in the year's SAR scene (dB):

- level: the mean inside the outline;
- local contrast: that mean minus the mean of a ring 20-60 m around it (pixels on slumps or
  water left out), which is what a detector looking at a neighbourhood can use.

Each is reduced to a ROC AUC (0.5: no better than chance; 1: every slump above every background
patch). Per region and band: `level AUC`, `local AUC`, counts.

Run: .venv/bin/python benchmarks/sar_separability.py REGION_DIR [REGION_DIR ...]
     (regions from `rtsmap demo-data`; about 20 s per 6 km region on one core)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pystac
import rasterio
import rasterio.features
import shapely
from shapely import affinity

SAR_COLLECTION = "rtsmap-demo-s1-rtc"
PATCHES_PER_SLUMP = 3
EDGE_M = 200.0
"""Background patches keep this far inside the region square."""
RING_M = (20.0, 60.0)


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC = P(pos > neg) + P(pos == neg) / 2 (the Mann-Whitney statistic)."""
    neg = np.sort(np.asarray(neg))
    below = np.searchsorted(neg, pos, side="left")
    at_or_below = np.searchsorted(neg, pos, side="right")
    return float((below + 0.5 * (at_or_below - below)).sum() / (len(pos) * len(neg)))


def _mask(geom, src) -> np.ndarray:
    g = gpd.GeoSeries([geom], crs=3413).to_crs(src.crs).iloc[0]
    if g.is_empty:
        return np.zeros(src.shape, bool)
    return rasterio.features.rasterize([(g, 1)], out_shape=src.shape, transform=src.transform, dtype="uint8") > 0


def _measure(db: np.ndarray, src, poly, excluded: np.ndarray) -> tuple[float, float] | None:
    """(level, local contrast) of one outline, or None where too few pixels."""
    inside = _mask(poly, src)
    ring = _mask(poly.buffer(RING_M[1]).difference(poly.buffer(RING_M[0])), src) & ~excluded
    if inside.sum() < 2 or ring.sum() < 10:
        return None
    level = float(np.nanmean(db[inside]))
    return level, level - float(np.nanmean(db[ring]))


def region_separability(root: Path, band: str, seed: int = 0) -> dict:
    """Level and local-contrast AUC of one region's SAR band against background patches."""
    rng = np.random.default_rng(seed)
    meta = json.loads((root / "region.json").read_text())
    minx, miny, maxx, maxy = meta["bounds_3413"]
    truth = {y: gpd.read_file(root / "truth.gpkg", layer=f"rts_{y}") for y in meta["years"]}
    d = gpd.read_file(root / "truth.gpkg", layer="distractors")
    water = shapely.union_all(list(d[d["class"].isin(["lake", "river"])].geometry.buffer(20.0)))
    occupied = shapely.union_all([g.buffer(20.0) for t in truth.values() for g in t.geometry]).union(water)
    items = [i for i in pystac.ItemCollection.from_file(str(root / "stac" / "items.json")) if i.collection_id == SAR_COLLECTION]
    pos, neg = [], []
    for item in items:
        with rasterio.open(item.assets[band].href) as src:
            a = src.read(1).astype(np.float64)
            db = 10 * np.log10(np.where(a > 0, a, np.nan))
            excluded = _mask(occupied, src)
            for poly in truth[item.datetime.year].geometry:
                m = _measure(db, src, poly, excluded)
                if m is None:
                    continue
                pos.append(m)
                c, got = poly.centroid, 0
                for _ in range(400):
                    if got == PATCHES_PER_SLUMP:
                        break
                    x, y = rng.uniform(minx + EDGE_M, maxx - EDGE_M), rng.uniform(miny + EDGE_M, maxy - EDGE_M)
                    q = affinity.translate(poly, x - c.x, y - c.y)
                    if q.buffer(RING_M[1]).intersects(occupied):
                        continue
                    mq = _measure(db, src, q, excluded)
                    if mq is not None:
                        neg.append(mq)
                        got += 1
    p, n = np.array(pos), np.array(neg)
    return {"region": str(root), "band": band, "slumps": len(p), "background": len(n),
            "level_auc": round(auc(p[:, 0], n[:, 0]), 3), "local_auc": round(auc(p[:, 1], n[:, 1]), 3),
            "median_local_contrast_db": round(float(np.median(p[:, 1])), 2)}


def main(argv: list[str]) -> int:
    roots = [Path(a) for a in argv]
    if not roots:
        print("error: give one or more demo region directories (from rtsmap demo-data)", file=sys.stderr)
        return 2
    for root in roots:
        if not (root / "region.json").is_file() or not (root / "stac" / "items.json").is_file():
            print(f"error: {root} is not a demo region (no region.json or stac/items.json)", file=sys.stderr)
            return 2
    for root in roots:
        for band in ("vv", "vh"):
            print(json.dumps(region_separability(root, band)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
