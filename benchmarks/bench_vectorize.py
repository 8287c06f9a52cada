"""Vectorize benchmark: masks per second, one GDAL call per tile against one per mask.

``python -m benchmarks.bench_vectorize [--tiles 200] [--instances 20] [--json out.json]``

Synthetic tiles (256 px, like the default grid) each hold ``--instances`` random blob masks
(ellipses with ragged edges and holes, 8-80 px across, overlapping one another), as the model
returns them: cropped to their boxes, in chunk pixels. Both ways run the same overlap rule first
(``suppress_overlaps``), then

- ``per-mask``: one ``rasterio.features.shapes`` call per mask (``mask_to_geometry``), the way
  vectorize worked before;
- ``per-tile``: one call per tile on a label image (``tile_geometries``), the way it works now.

It reports masks per CPU second of each and of the whole ``vectorize_detections`` (overlap rule,
simplification and table included), and checks that both ways give the same polygon for every
instance.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from rtsmap.pipeline.infer import TileDetections
from rtsmap.pipeline.vectorize import mask_to_geometry, suppress_overlaps, tile_geometries, vectorize_detections

TILE_PX = 256
TRANSFORM = Affine(10.0, 0.0, -2_000_000.0, 0.0, -10.0, 1_000_000.0)


def blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """A lobed ellipse of about ``size`` px across, sometimes with a hole."""
    h, w = size, max(4, int(size * rng.uniform(0.5, 1.0)))
    yy, xx = np.mgrid[:h, :w]
    r = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2
    theta = np.arctan2(yy - h / 2, xx - w / 2)
    lobes = 0.8 + 0.2 * np.sin(int(rng.integers(2, 6)) * theta + rng.uniform(0, 2 * np.pi))
    mask = r < lobes
    if rng.random() < 0.3:
        mask &= r > 0.1
    return mask


def synthetic_tiles(n_tiles: int, instances: int, seed: int = 0) -> list[TileDetections]:
    """Tiles of random overlapping instance masks in one chunk's pixels."""
    rng = np.random.default_rng(seed)
    tiles = []
    for t in range(n_tiles):
        row0, col0 = (t // 4) * TILE_PX, (t % 4) * TILE_PX
        masks, offsets = [], []
        for _ in range(instances):
            m = blob(rng, int(rng.integers(8, 80)))
            r = row0 + int(rng.integers(0, TILE_PX - m.shape[0]))
            c = col0 + int(rng.integers(0, TILE_PX - m.shape[1]))
            masks.append(m)
            offsets.append((r, c))
        n = len(masks)
        tiles.append(TileDetections(
            tile_id=f"3413_10m_t{t % 4}_{t // 4}", chunk_id="3413_10m_c0_r0",
            boxes=np.zeros((n, 4), np.float32), scores=np.sort(rng.uniform(0.3, 1.0, n))[::-1].astype(np.float32),
            masks=tuple(masks), offsets=tuple(offsets), invalid_fractions=np.zeros(n, np.float32)))
    return tiles


def per_mask(tiles: list[TileDetections]) -> list:
    with rasterio.Env():
        return [mask_to_geometry(m, TRANSFORM @ Affine.translation(c, r)) for t in tiles
                for m, (r, c) in zip(t.masks, t.offsets)]


def per_tile(tiles: list[TileDetections]) -> list:
    with rasterio.Env():
        return [g for t in tiles for g in tile_geometries(t, TRANSFORM)]


def timed(fn, *args) -> tuple[float, object]:
    """CPU seconds of one call (single-threaded work; steadier than wall time on a shared machine)."""
    t0 = time.process_time()
    out = fn(*args)
    return time.process_time() - t0, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=200)
    parser.add_argument("--instances", type=int, default=20, help="masks per tile before the overlap rule")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.tiles < 1 or args.instances < 1:
        parser.exit(2, "error: --tiles and --instances must be positive\n")
    if args.json and Path(args.json).exists():
        parser.exit(2, f"error: {args.json} exists\n")
    raw = synthetic_tiles(args.tiles, args.instances)
    tiles = [suppress_overlaps(t) for t in raw]
    n = sum(len(t.masks) for t in tiles)
    t_mask, a = timed(per_mask, tiles)
    t_tile, b = timed(per_tile, tiles)
    same = all(x.normalize().equals_exact(y.normalize(), 0.0) for x, y in zip(a, b)) and len(a) == len(b)
    # The old way: the same overlap rule, then one call per mask.
    # One call for all tiles, as for one chunk in a run.
    t_old, _ = timed(lambda: vectorize_detections([suppress_overlaps(t) for t in raw], TRANSFORM, "EPSG:3413",
                                                  year=2021, min_kept_fraction=None))
    t_new, _ = timed(lambda: vectorize_detections(raw, TRANSFORM, "EPSG:3413", year=2021))
    report = {
        "tiles": args.tiles, "masks_after_overlap_rule": n,
        "polygonize_per_mask_masks_per_s": n / t_mask, "polygonize_per_tile_masks_per_s": n / t_tile,
        "vectorize_per_mask_masks_per_s": n / t_old, "vectorize_per_tile_masks_per_s": n / t_new,
        "same_polygons": bool(same),
    }
    print(f"{args.tiles} tiles, {n} masks after the overlap rule")
    print(f"polygonize: per mask {n / t_mask:8.0f} masks/s, per tile (label image) {n / t_tile:8.0f} masks/s "
          f"({t_mask / t_tile:.1f}x); same polygons: {same}")
    print(f"vectorize_detections (overlap rule, simplify, table): "
          f"per mask {n / t_old:8.0f} masks/s, per tile {n / t_new:8.0f} masks/s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
