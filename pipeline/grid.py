"""The processing grid: tiles (model inputs) grouped into chunks (units of I/O and of work).

The grid is anchored at (0, 0) of its CRS (the North Pole for EPSG:3413), so a place has the
same tile and chunk ids in every run and every year, whatever AOI is around it.

Tile ``(col, row)`` covers map x from ``col * stride`` to ``col * stride + tile`` and map y
from ``-row * stride`` down to ``-row * stride - tile`` (``stride`` and ``tile`` in map units;
rows grow southward like raster rows). Tiles overlap their right and lower neighbours by
``overlap_px``. Chunk ``(col, row)`` owns tiles ``col * tiles_per_chunk ..`` and reads a window
that holds all of its tiles whole, so tiles overlap across chunk seams exactly as inside a
chunk.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS
from pyproj.exceptions import CRSError
from shapely.geometry.base import BaseGeometry

from rtsmap.pipeline.errors import ConfigError

Bounds = tuple[float, float, float, float]

_CHUNK_ID = re.compile(r"^(?P<epsg>\d+)_(?P<res>[0-9.eE+-]+)m_c(?P<col>-?\d+)_r(?P<row>-?\d+)$")


@dataclass(frozen=True)
class GridSpec:
    """The shape of the grid; the same spec always gives the same ids."""

    crs: str = "EPSG:3413"
    """Projected CRS of the grid, with an EPSG code (ids carry it)."""

    resolution: float = 10.0
    """Pixel size in CRS units (metres for EPSG:3413)."""

    tile_px: int = 256
    """Side of a tile in pixels: the model's input size."""

    overlap_px: int = 32
    """Pixels a tile shares with its right and lower neighbours."""

    tiles_per_chunk: int = 8
    """Tiles along each side of a chunk."""

    def __post_init__(self):
        for name in ("tile_px", "overlap_px", "tiles_per_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"grid {name} must be an integer, got {value!r}")
        if not self.tile_px > self.overlap_px >= 0:
            raise ConfigError(f"grid needs tile_px > overlap_px >= 0, got tile_px="
                              f"{self.tile_px}, overlap_px={self.overlap_px}")
        if self.tiles_per_chunk < 1:
            raise ConfigError(f"grid tiles_per_chunk must be >= 1, got {self.tiles_per_chunk}")
        try:
            resolution = float(self.resolution)
        except (TypeError, ValueError):
            resolution = math.nan
        if not (math.isfinite(resolution) and resolution > 0):
            raise ConfigError(f"grid resolution must be a positive number, got "
                              f"{self.resolution!r}")
        # Plain Python numbers, so ids, bounds and equality do not depend on the input type.
        object.__setattr__(self, "resolution", resolution)
        for name in ("tile_px", "overlap_px", "tiles_per_chunk"):
            object.__setattr__(self, name, int(getattr(self, name)))
        try:
            crs = CRS.from_user_input(self.crs)
        except CRSError as exc:
            raise ConfigError(f"grid CRS {self.crs!r} is not a CRS pyproj knows: {exc}") from exc
        if not crs.is_projected:
            raise ConfigError(f"grid CRS {self.crs!r} is not projected; use a projected CRS "
                              "in metres such as EPSG:3413")
        if crs.to_epsg() is None:
            raise ConfigError(f"grid CRS {self.crs!r} has no EPSG code; grid ids need one, "
                              "use an EPSG CRS such as EPSG:3413")

    @property
    def stride_px(self) -> int:
        """Pixels from one tile's origin to the next: ``tile_px - overlap_px``."""
        return self.tile_px - self.overlap_px

    @property
    def chunk_px(self) -> int:
        """Pixels from one chunk's origin to the next: ``tiles_per_chunk * stride_px``."""
        return self.tiles_per_chunk * self.stride_px

    @property
    def window_px(self) -> int:
        """Side of a chunk's read window: ``chunk_px + overlap_px`` (all its tiles whole)."""
        return self.chunk_px + self.overlap_px

    @cached_property
    def epsg(self) -> int:
        """EPSG code of ``crs`` (parsed once per spec)."""
        return CRS.from_user_input(self.crs).to_epsg()

    def tile_id(self, col: int, row: int) -> str:
        """Id of tile (col, row), e.g. ``3413_10m_t-96_322``."""
        return f"{self.epsg}_{self.resolution:g}m_t{col}_{row}"

    def chunk_id(self, col: int, row: int) -> str:
        """Id of chunk (col, row), e.g. ``3413_10m_c-12_r40``."""
        return f"{self.epsg}_{self.resolution:g}m_c{col}_r{row}"

    def tile_bounds(self, col: int, row: int) -> Bounds:
        """(minx, miny, maxx, maxy) of tile (col, row) in map units."""
        # Integer pixel offsets times the resolution: exact for whole-metre resolutions.
        x0 = col * self.stride_px * self.resolution
        y1 = -(row * self.stride_px) * self.resolution
        size = self.tile_px * self.resolution
        return (x0, y1 - size, x0 + size, y1)

    def chunk_bounds(self, col: int, row: int) -> Bounds:
        """(minx, miny, maxx, maxy) of the read window of chunk (col, row)."""
        x0 = col * self.chunk_px * self.resolution
        y1 = -(row * self.chunk_px) * self.resolution
        size = self.window_px * self.resolution
        return (x0, y1 - size, x0 + size, y1)


@dataclass(frozen=True)
class Tile:
    """One model input: ``tile_px`` square pixels of the grid."""

    id: str
    """Stable id, ``f"{epsg}_{res:g}m_t{col}_{row}"``."""

    col: int
    """Tile column (grows eastward from x=0; may be negative)."""

    row: int
    """Tile row (grows southward from y=0; may be negative)."""

    chunk_id: str
    """Id of the chunk that owns this tile."""

    offset: tuple[int, int]
    """(row0, col0): the tile's first pixel in its chunk's read window."""

    bounds: Bounds
    """(minx, miny, maxx, maxy) in the grid CRS."""


@dataclass(frozen=True)
class Chunk:
    """A block of tiles read and processed together (one Dask task per chunk and year)."""

    id: str
    """Stable id, ``f"{epsg}_{res:g}m_c{col}_r{row}"``."""

    col: int
    """Chunk column: tiles with ``tile.col // tiles_per_chunk == col``."""

    row: int
    """Chunk row: tiles with ``tile.row // tiles_per_chunk == row``."""

    spec: GridSpec
    """The grid this chunk belongs to."""

    bounds: Bounds
    """(minx, miny, maxx, maxy) of the read window in the grid CRS."""

    transform: Affine
    """Affine transform of the read window (north-up, pixel size ``spec.resolution``)."""

    shape: tuple[int, int]
    """(height, width) of the read window in pixels: ``spec.window_px`` each."""

    tiles: tuple[Tile, ...]
    """The tiles of this chunk to process (those touching the AOI), row by row."""

    def tile_window(self, tile: Tile) -> tuple[slice, slice]:
        """(row slice, col slice) of ``tile`` in this chunk's read window.

        Raises
        ------
        ValueError
            The tile belongs to another chunk.
        """
        if tile.chunk_id != self.id:
            raise ValueError(f"tile {tile.id} belongs to chunk {tile.chunk_id}, not {self.id}")
        row0, col0 = tile.offset
        size = self.spec.tile_px
        return slice(row0, row0 + size), slice(col0, col0 + size)


def plan_grid(aoi_geometry: BaseGeometry, spec: GridSpec) -> list[Chunk]:
    """The chunks and tiles that cover an AOI.

    Parameters
    ----------
    aoi_geometry : shapely geometry
        The AOI polygon(s) in ``spec.crs`` (e.g. ``AOI.geometry``).
    spec : GridSpec
        The grid.

    Returns
    -------
    list of Chunk
        Chunks with at least one tile touching the AOI, sorted by id; each holds only its
        tiles that touch the AOI. "Touching" means sharing area with the polygon (not its
        bounding box): a tile that only meets the AOI along its edge or at a corner has
        nothing to map and is left out.

    Notes
    -----
    Chunks are tested first: a chunk whose read window lies inside the AOI takes all its
    tiles without testing them, so only chunks on the AOI boundary test their tiles (with
    vectorized shapely predicates). Planning time grows with the AOI's perimeter, not its
    area; the ``Tile`` objects themselves dominate for very large AOIs.
    """
    if aoi_geometry is None or aoi_geometry.is_empty:
        return []
    geom = aoi_geometry
    shapely.prepare(geom)
    n = spec.tiles_per_chunk
    minx, miny, maxx, maxy = geom.bounds
    # Candidate tiles from the AOI bounds (generous by one tile; the predicates decide).
    stride = spec.stride_px * spec.resolution
    size = spec.tile_px * spec.resolution
    col0, col1 = math.floor((minx - size) / stride), math.floor(maxx / stride)
    row0, row1 = math.floor((-maxy - size) / stride), math.floor(-miny / stride)

    chunk_cols = np.arange(col0 // n, col1 // n + 1)
    chunk_rows = np.arange(row0 // n, row1 // n + 1)
    ccol, crow = (a.ravel() for a in np.meshgrid(chunk_cols, chunk_rows))
    windows = _boxes(ccol * spec.chunk_px, crow * spec.chunk_px, spec.window_px, spec.resolution)
    hit = _shares_area(geom, windows)
    inside = hit & shapely.contains(geom, windows)

    # Tile offsets (in tiles) inside a chunk, row by row.
    trow, tcol = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    chunks = []
    for cc, cr, is_inside in zip(ccol[hit], crow[hit], inside[hit]):
        cols, rows = cc * n + tcol, cr * n + trow
        if not is_inside:
            tiles = _boxes(cols * spec.stride_px, rows * spec.stride_px, spec.tile_px,
                           spec.resolution)
            keep = _shares_area(geom, tiles)
            cols, rows = cols[keep], rows[keep]
        if len(cols):
            chunks.append(_make_chunk(spec, int(cc), int(cr), zip(cols.tolist(), rows.tolist())))
    chunks.sort(key=lambda chunk: chunk.id)
    return chunks


def parse_chunk_id(chunk_id: str) -> tuple[int, float, int, int]:
    """Split a chunk id into (epsg, resolution, col, row).

    Raises
    ------
    ConfigError
        ``chunk_id`` is not a chunk id.
    """
    match = _CHUNK_ID.match(chunk_id)
    if match is None:
        raise ConfigError(f"{chunk_id!r} is not a chunk id (expected e.g. 3413_10m_c-12_r40)")
    return (int(match["epsg"]), float(match["res"]), int(match["col"]), int(match["row"]))


def chunk_by_id(chunk_id: str, spec: GridSpec,
                aoi_geometry: BaseGeometry | None = None) -> Chunk:
    """Rebuild a chunk from its id (e.g. one read from a fragment name, a log or a benchmark
    argument; the run itself sends workers whole :class:`Chunk` objects).

    Parameters
    ----------
    chunk_id : str
        A chunk id made with ``spec``.
    spec : GridSpec
        The grid the id belongs to. Only its CRS and resolution are in the id; the tile
        size, overlap and tiles per chunk must be the ones the id was planned with.
    aoi_geometry : shapely geometry, optional
        If given, keep only the tiles touching it (as :func:`plan_grid` does); the chunk is
        then equal to the one :func:`plan_grid` returned (it may have no tiles if the AOI
        does not reach it). If None, all ``tiles_per_chunk ** 2`` tiles.

    Returns
    -------
    Chunk

    Raises
    ------
    ConfigError
        The id is malformed or was made for another CRS or resolution.
    """
    epsg, _, col, row = parse_chunk_id(chunk_id)
    if chunk_id != spec.chunk_id(col, row):
        raise ConfigError(f"chunk id {chunk_id!r} does not belong to the grid EPSG:{spec.epsg} "
                          f"at {spec.resolution:g} m; use the grid settings it was planned with")
    n = spec.tiles_per_chunk
    trow, tcol = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    cols, rows = col * n + tcol, row * n + trow
    if aoi_geometry is not None:
        if aoi_geometry.is_empty:
            cols, rows = cols[:0], rows[:0]
        else:
            shapely.prepare(aoi_geometry)
            keep = _shares_area(aoi_geometry, _boxes(cols * spec.stride_px, rows * spec.stride_px,
                                                     spec.tile_px, spec.resolution))
            cols, rows = cols[keep], rows[keep]
    return _make_chunk(spec, col, row, zip(cols.tolist(), rows.tolist()))


def _boxes(x_px: np.ndarray, y_px: np.ndarray, size_px: int, resolution: float) -> np.ndarray:
    """Boxes whose top-left corners are (x_px, -y_px) grid pixels from the origin."""
    x0 = x_px * resolution
    y1 = -(y_px * resolution)
    size = size_px * resolution
    return shapely.box(x0, y1 - size, x0 + size, y1)


def _shares_area(geom: BaseGeometry, boxes: np.ndarray) -> np.ndarray:
    """Which boxes share area with geom: intersect it, and not only along the boundary."""
    return shapely.intersects(geom, boxes) & ~shapely.touches(geom, boxes)


def _make_chunk(spec: GridSpec, col: int, row: int, tiles_colrow) -> Chunk:
    chunk_id = spec.chunk_id(col, row)
    first_col, first_row = col * spec.tiles_per_chunk, row * spec.tiles_per_chunk
    tiles = tuple(
        Tile(id=spec.tile_id(i, j), col=i, row=j, chunk_id=chunk_id,
             offset=((j - first_row) * spec.stride_px, (i - first_col) * spec.stride_px),
             bounds=spec.tile_bounds(i, j))
        for i, j in sorted(tiles_colrow, key=lambda ij: (ij[1], ij[0]))
    )
    bounds = spec.chunk_bounds(col, row)
    transform = Affine(spec.resolution, 0.0, bounds[0], 0.0, -spec.resolution, bounds[3])
    return Chunk(id=chunk_id, col=col, row=row, spec=spec, bounds=bounds, transform=transform,
                 shape=(spec.window_px, spec.window_px), tiles=tiles)


# --- blocks: the grid planned a piece at a time ---------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A square of ``block_chunks x block_chunks`` chunks, anchored at the grid origin.

    Pan-Arctic AOIs hold ~10^5 chunks and ~10^7 tiles: planning, searching and scheduling go a
    block at a time so that no list of every chunk (or tile) ever exists.
    """

    col: int
    """Block column: chunks with ``chunk.col // block_chunks == col``."""

    row: int
    """Block row: chunks with ``chunk.row // block_chunks == row``."""

    block_chunks: int
    """Chunks along each side of the block."""

    bounds: Bounds
    """(minx, miny, maxx, maxy) of the union of its chunks' read windows, in the grid CRS."""


def _block_bounds(spec: GridSpec, col: int, row: int, n: int) -> Bounds:
    minx, _, _, maxy = spec.chunk_bounds(col * n, row * n)
    _, miny, maxx, _ = spec.chunk_bounds(col * n + n - 1, row * n + n - 1)
    return (minx, miny, maxx, maxy)


def plan_blocks(aoi_geometry: BaseGeometry, spec: GridSpec, block_chunks: int = 16) -> list[Block]:
    """The blocks whose chunk windows share area with the AOI, in row-major order.

    Parameters
    ----------
    aoi_geometry : shapely geometry
        The AOI in ``spec.crs``.
    spec : GridSpec
        The grid.
    block_chunks : int
        Chunks along a block side.

    Returns
    -------
    list of Block
        Every chunk :func:`plan_grid` returns lies in one of them (a block may hold no chunk
        when the AOI only grazes its windows' overlap).

    Raises
    ------
    ConfigError
        ``block_chunks`` is not a positive integer.
    """
    if isinstance(block_chunks, bool) or not isinstance(block_chunks, (int, np.integer)) or block_chunks < 1:
        raise ConfigError(f"block_chunks must be a positive integer, got {block_chunks!r}")
    if aoi_geometry is None or aoi_geometry.is_empty:
        return []
    n = int(block_chunks)
    shapely.prepare(aoi_geometry)
    minx, miny, maxx, maxy = aoi_geometry.bounds
    step = spec.chunk_px * spec.resolution
    window = spec.window_px * spec.resolution
    # Chunk index range from the AOI bounds (generous by one; the predicate decides).
    c0, c1 = math.floor((minx - window) / step), math.floor(maxx / step)
    r0, r1 = math.floor((-maxy - window) / step), math.floor(-miny / step)
    bcols = np.arange(c0 // n, c1 // n + 1)
    brows = np.arange(r0 // n, r1 // n + 1)
    bc, br = (a.ravel() for a in np.meshgrid(bcols, brows))
    bounds = [_block_bounds(spec, int(c), int(r), n) for c, r in zip(bc, br)]
    boxes = shapely.box(*np.array(bounds).T) if bounds else np.array([])
    hit = _shares_area(aoi_geometry, boxes) if len(bounds) else np.zeros(0, bool)
    blocks = [Block(int(c), int(r), n, b) for c, r, b, h in zip(bc, br, bounds, hit) if h]
    blocks.sort(key=lambda b: (b.row, b.col))
    return blocks


@dataclass(frozen=True)
class BlockCells:
    """The chunks of one block as arrays: ids, tile counts and windows without Chunk or Tile objects.

    A plan needs tile counts and chunk windows, not tiles: a pan-Arctic AOI has ~10^7 tiles.
    :meth:`chunk` makes the full :class:`Chunk` (with its tiles) of one cell when a task needs it.
    """

    spec: GridSpec
    """The grid."""
    block: Block
    """The block these chunks belong to."""
    cols: np.ndarray
    """Chunk columns (int64), in chunk id order."""
    rows: np.ndarray
    """Chunk rows (int64), in chunk id order."""
    tile_mask: np.ndarray
    """(chunks, tiles_per_chunk ** 2) bool: which tiles of each chunk share area with the AOI,
    tile offsets row by row."""

    def __len__(self) -> int:
        return len(self.cols)

    @property
    def ids(self) -> list[str]:
        """Chunk ids, sorted."""
        return [self.spec.chunk_id(int(c), int(r)) for c, r in zip(self.cols, self.rows)]

    @property
    def tile_counts(self) -> np.ndarray:
        """Tiles touching the AOI, per chunk."""
        return self.tile_mask.sum(axis=1)

    def windows(self) -> np.ndarray:
        """The chunks' read windows as shapely boxes (grid CRS)."""
        spec = self.spec
        return _boxes(self.cols * spec.chunk_px, self.rows * spec.chunk_px, spec.window_px, spec.resolution)

    def bounds(self) -> np.ndarray:
        """(chunks, 4) array of the read windows' (minx, miny, maxx, maxy)."""
        spec = self.spec
        x0 = self.cols * spec.chunk_px * spec.resolution
        y1 = -(self.rows * spec.chunk_px) * spec.resolution
        size = spec.window_px * spec.resolution
        return np.column_stack([x0, y1 - size, x0 + size, y1]).astype(float)

    def chunk(self, i: int) -> Chunk:
        """The :class:`Chunk` of cell ``i``, with its tiles (equal to :func:`plan_grid`'s)."""
        spec, n = self.spec, self.spec.tiles_per_chunk
        col, row = int(self.cols[i]), int(self.rows[i])
        trow, tcol = np.divmod(np.flatnonzero(self.tile_mask[i]), n)
        return _make_chunk(spec, col, row, zip((col * n + tcol).tolist(), (row * n + trow).tolist()))

    def chunks(self) -> list[Chunk]:
        """Every chunk of the block, sorted by id."""
        return [self.chunk(i) for i in range(len(self))]


def block_cells(aoi_geometry: BaseGeometry, spec: GridSpec, block: Block) -> BlockCells:
    """The chunks of one block that :func:`plan_grid` would return, as arrays (no Tile objects).

    The AOI is first cut to the block (with a margin of one read window), so the predicates
    test a small geometry; a chunk or tile lying inside the cut meets the cut AOI exactly as it
    meets the whole one. Chunks inside the AOI take all their tiles untested; the tiles of the
    boundary chunks are tested in one vectorised call.

    Parameters
    ----------
    aoi_geometry : shapely geometry
        The AOI in ``spec.crs``.
    spec : GridSpec
        The grid.
    block : Block
        From :func:`plan_blocks`.

    Returns
    -------
    BlockCells
    """
    n = block.block_chunks
    t = spec.tiles_per_chunk
    empty = BlockCells(spec, block, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, t * t), bool))
    margin = spec.window_px * spec.resolution
    minx, miny, maxx, maxy = block.bounds
    cut = shapely.intersection(aoi_geometry, shapely.box(minx - margin, miny - margin, maxx + margin, maxy + margin))
    if cut.is_empty:
        return empty
    shapely.prepare(cut)
    ccol, crow = (a.ravel().astype(np.int64) for a in np.meshgrid(np.arange(block.col * n, block.col * n + n),
                                                                  np.arange(block.row * n, block.row * n + n)))
    windows = _boxes(ccol * spec.chunk_px, crow * spec.chunk_px, spec.window_px, spec.resolution)
    hit = _shares_area(cut, windows)
    inside = shapely.contains(cut, windows[hit])
    ccol, crow = ccol[hit], crow[hit]
    mask = np.ones((len(ccol), t * t), dtype=bool)
    edge = np.flatnonzero(~inside)
    if len(edge):
        trow, tcol = np.divmod(np.arange(t * t), t)
        cols = (ccol[edge, None] * t + tcol[None, :]).ravel()
        rows = (crow[edge, None] * t + trow[None, :]).ravel()
        keep = _shares_area(cut, _boxes(cols * spec.stride_px, rows * spec.stride_px, spec.tile_px, spec.resolution))
        mask[edge] = keep.reshape(len(edge), t * t)
    some = mask.any(axis=1)
    ccol, crow, mask = ccol[some], crow[some], mask[some]
    order = sorted(range(len(ccol)), key=lambda i: spec.chunk_id(int(ccol[i]), int(crow[i])))
    return BlockCells(spec, block, ccol[order], crow[order], mask[order])


def chunks_of_block(aoi_geometry: BaseGeometry, spec: GridSpec, block: Block) -> list[Chunk]:
    """The chunks of one block that :func:`plan_grid` would return, sorted by id (with tiles).

    See :func:`block_cells` (the same chunks as arrays, which a plan uses instead).

    Parameters
    ----------
    aoi_geometry : shapely geometry
        The AOI in ``spec.crs``.
    spec : GridSpec
        The grid.
    block : Block
        From :func:`plan_blocks`.

    Returns
    -------
    list of Chunk
    """
    return block_cells(aoi_geometry, spec, block).chunks()


def plan_grid_cells(geom: BaseGeometry, spec: GridSpec, cols: range, rows: range) -> list[Chunk]:
    """The chunks among columns ``cols`` and rows ``rows`` with a tile sharing area with ``geom``.

    The same test as :func:`plan_grid`, on a given range of chunks (sorted by id).
    """
    shapely.prepare(geom)
    n = spec.tiles_per_chunk
    ccol, crow = (a.ravel() for a in np.meshgrid(np.asarray(cols), np.asarray(rows)))
    windows = _boxes(ccol * spec.chunk_px, crow * spec.chunk_px, spec.window_px, spec.resolution)
    hit = _shares_area(geom, windows)
    inside = hit & shapely.contains(geom, windows)
    trow, tcol = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    chunks = []
    for cc, cr, is_inside in zip(ccol[hit], crow[hit], inside[hit]):
        tc, tr = cc * n + tcol, cr * n + trow
        if not is_inside:
            keep = _shares_area(geom, _boxes(tc * spec.stride_px, tr * spec.stride_px, spec.tile_px,
                                             spec.resolution))
            tc, tr = tc[keep], tr[keep]
        if len(tc):
            chunks.append(_make_chunk(spec, int(cc), int(cr), zip(tc.tolist(), tr.tolist())))
    chunks.sort(key=lambda chunk: chunk.id)
    return chunks


def iter_chunks(aoi_geometry: BaseGeometry, spec: GridSpec, block_chunks: int = 16):
    """Yield ``(block, chunks of the block)`` for every block of the AOI, one block at a time.

    Together the blocks' chunks are exactly :func:`plan_grid`'s (in block order, each block's
    sorted by id); only one block's chunks and tiles exist at a time.
    """
    for block in plan_blocks(aoi_geometry, spec, block_chunks):
        chunks = chunks_of_block(aoi_geometry, spec, block)
        if chunks:
            yield block, chunks



def estimate_chunks(aoi_geometry: BaseGeometry, spec: GridSpec) -> int:
    """An upper estimate of the chunks of an AOI from its area and perimeter, computed in no time.

    Used to refuse an AOI whose plan would not fit in memory before anything is allocated.
    """
    if aoi_geometry is None or aoi_geometry.is_empty:
        return 0
    step = spec.chunk_px * spec.resolution
    # Area in chunk cells, plus a ring of cells along the boundary.
    return int(math.ceil(aoi_geometry.area / step ** 2 + 2 * aoi_geometry.length / step + 4))
