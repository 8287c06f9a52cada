"""Terrain derivatives of a DEM: slope, hillshade and relative elevation.

Plain numpy on one array in a projected CRS with square pixels, in float32 (window means are
summed in float64, whose running sums stay exact) and in strips of :data:`STRIP_ROWS` rows, so
the temporaries are a strip's size, not the buffered chunk's. Every derivative looks at a
neighbourhood, so a chunk's derivatives are only exact where that neighbourhood lies inside the
array: compute them on an elevation window grown by :func:`required_buffer_px` pixels on each
side and crop the result (``pipeline.load`` does this), and adjacent chunks agree on their
overlap.

Invalid elevation is NaN in and NaN out: a derivative is NaN wherever its neighbourhood holds no
valid elevation (slope/hillshade: any of the 3x3 neighbours; relative elevation: the pixel itself,
its mean is taken over the valid pixels of the window).
"""

from __future__ import annotations

import numpy as np

#: Size of the window for the local mean of relative elevation, in metres.
RELATIVE_ELEVATION_WINDOW_M = 300.0
#: Sun position for the hillshade (the cartographic convention: from the north-west, 45 deg up).
HILLSHADE_AZIMUTH_DEG = 315.0
HILLSHADE_ALTITUDE_DEG = 45.0
#: Rows computed at a time: the temporaries (gradients, window sums) are the size of a strip
#: (``STRIP_ROWS + 2 * radius`` rows), not of the buffered chunk window.
STRIP_ROWS = 256


def window_radius_px(resolution: float, window_m: float = RELATIVE_ELEVATION_WINDOW_M) -> int:
    """Half-size in pixels of the relative-elevation window (the window is ``2r+1`` pixels).

    Parameters
    ----------
    resolution : float
        Pixel size in metres.
    window_m : float
        Window size in metres (~300 m).

    Returns
    -------
    int
        ``r >= 1`` such that ``(2r+1) * resolution`` is the odd window closest to ``window_m``.
    """
    return max(1, int(round(window_m / resolution / 2.0)))


def required_buffer_px(resolution: float, window_m: float = RELATIVE_ELEVATION_WINDOW_M) -> int:
    """Pixels of elevation needed around a window so that all derivatives inside it are exact.

    Parameters
    ----------
    resolution : float
        Pixel size in metres.
    window_m : float
        Relative-elevation window size in metres.

    Returns
    -------
    int
        The relative-elevation radius (slope needs only 1 pixel, always less).
    """
    return window_radius_px(resolution, window_m)


def _gradients(elevation: np.ndarray, resolution: float) -> tuple[np.ndarray, np.ndarray]:
    """dz/dx (east) and dz/dy (north) by central differences in float32, NaN on the array border.

    The border is NaN rather than a one-sided difference so that a value is either exact or
    absent: an exact value never depends on where the array happens to end.
    """
    z = np.asarray(elevation, dtype=np.float32)
    step = np.float32(2.0 * resolution)
    dzdx = np.full(z.shape, np.nan, dtype=np.float32)
    dzdy = np.full(z.shape, np.nan, dtype=np.float32)
    np.subtract(z[:, 2:], z[:, :-2], out=dzdx[:, 1:-1])
    dzdx[:, 1:-1] /= step
    # rows grow southward, so north is minus the row direction
    np.subtract(z[:-2, :], z[2:, :], out=dzdy[1:-1, :])
    dzdy[1:-1, :] /= step
    return dzdx, dzdy


def slope_degrees(elevation: np.ndarray, resolution: float) -> np.ndarray:
    """Slope in degrees (0 flat .. 90 vertical).

    Parameters
    ----------
    elevation : np.ndarray
        ``[H, W]`` elevation in metres, NaN where invalid.
    resolution : float
        Pixel size in metres.

    Returns
    -------
    np.ndarray
        float32 ``[H, W]``, NaN on the outer pixel ring and next to invalid elevation.
    """
    return _slope(*_gradients(elevation, resolution))


def _slope(dzdx: np.ndarray, dzdy: np.ndarray) -> np.ndarray:
    # sqrt of the sum of squares, not np.hypot: several times faster, and a float32 gradient
    # would need to pass 1e19 to overflow
    slope = dzdx * dzdx
    slope += dzdy * dzdy
    np.sqrt(slope, out=slope)
    np.arctan(slope, out=slope)
    np.degrees(slope, out=slope)
    return slope.astype(np.float32, copy=False)


def hillshade(
    elevation: np.ndarray,
    resolution: float,
    azimuth_deg: float = HILLSHADE_AZIMUTH_DEG,
    altitude_deg: float = HILLSHADE_ALTITUDE_DEG,
) -> np.ndarray:
    """Hillshade in 0..1 (cosine of the angle between the surface normal and the sun).

    Parameters
    ----------
    elevation : np.ndarray
        ``[H, W]`` elevation in metres, NaN where invalid.
    resolution : float
        Pixel size in metres.
    azimuth_deg, altitude_deg : float
        Sun azimuth (clockwise from north) and altitude above the horizon.

    Returns
    -------
    np.ndarray
        float32 ``[H, W]`` in [0, 1] (self-shadowed slopes are 0), NaN where slope is NaN.
    """
    return _hillshade(*_gradients(elevation, resolution), azimuth_deg, altitude_deg)


def _hillshade(dzdx: np.ndarray, dzdy: np.ndarray, azimuth_deg: float, altitude_deg: float) -> np.ndarray:
    az = np.radians(azimuth_deg)
    alt = np.radians(altitude_deg)
    # Unit vector towards the sun (east, north, up) dotted with the unnormalised surface
    # normal (-dz/dx, -dz/dy, 1); float32 constants keep the arithmetic in float32.
    sun_e, sun_n, sun_u = (np.float32(v) for v in (np.cos(alt) * np.sin(az), np.cos(alt) * np.cos(az), np.sin(alt)))
    norm = dzdx * dzdx
    norm += dzdy * dzdy
    norm += np.float32(1.0)
    np.sqrt(norm, out=norm)
    shade = dzdx * -sun_e
    shade -= dzdy * sun_n
    shade += sun_u
    shade /= norm
    return np.clip(shade, 0.0, 1.0, out=shade).astype(np.float32, copy=False)


def _window_sums(values: np.ndarray, k: int) -> np.ndarray:
    """Sums of ``k`` consecutive rows (``[h - k + 1, w]``), accumulated in float64.

    A running sum down the rows (contiguous in memory, so numpy vectorises it across the row)
    differenced ``k`` rows apart; float64 keeps the difference of two large running sums exact
    to far below float32's resolution.
    """
    running = np.zeros((values.shape[0] + 1, values.shape[1]), dtype=np.float64)
    np.cumsum(values, axis=0, dtype=np.float64, out=running[1:])
    return running[k:] - running[:-k]


def _box_sums(values: np.ndarray, k: int) -> np.ndarray:
    """Sums over every whole ``k x k`` window (``[h - k + 1, w - k + 1]``, float64).

    Separable: sums down the rows, then (on the transposed, contiguous result) across the
    columns, because numpy has no box filter (scipy is not a dependency) and a running sum along
    a row is several times slower than one down the rows.
    """
    columns = _window_sums(values, k)
    return _window_sums(np.ascontiguousarray(columns.T), k).T


def _reference_level(z: np.ndarray) -> float:
    """A typical elevation of the window, subtracted before summing (smaller sums, same result).

    The median of every 8th pixel each way: any level near the data does, and a subsample
    costs a 64th of the full median.
    """
    sample = z[::8, ::8]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        finite = z[np.isfinite(z)]
        return float(finite[0]) if finite.size else 0.0
    return float(np.median(sample))


def _relative_rows(z: np.ndarray, radius: int, ref: float, r0: int, r1: int) -> np.ndarray:
    """Relative elevation of rows ``r0:r1`` of ``z`` (float32), read from rows ``r0 - radius``
    to ``r1 + radius`` only; NaN where the window leaves ``z`` (so every value is exact or absent,
    as in :func:`_gradients`) or the elevation is NaN."""
    h, w = z.shape
    k = 2 * radius + 1
    out = np.full((r1 - r0, w), np.nan, dtype=np.float32)
    top, bottom = max(0, r0 - radius), min(h, r1 + radius)
    if bottom - top < k or w < k:
        return out
    slab = z[top:bottom]
    valid = np.isfinite(slab)
    # centred on one level of the whole window, so the sums are small and every strip agrees
    centred = np.where(valid, slab - np.float32(ref), np.float32(0.0))
    total = _box_sums(centred, k)
    # a count only where elevation is missing; otherwise every whole window holds k*k pixels
    count = float(k * k) if valid.all() else _box_sums(valid, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (total / count).astype(np.float32)  # NaN only where the pixel itself is NaN
    # rows of z with a whole window inside the slab, within r0:r1
    lo, hi = max(r0, top + radius), min(r1, bottom - radius)
    inner = (slice(lo - top, hi - top), slice(radius, w - radius))
    rel = centred[inner] - mean[lo - top - radius : hi - top - radius]
    rel[~valid[inner]] = np.nan
    out[lo - r0 : hi - r0, radius : w - radius] = rel
    return out


def relative_elevation(
    elevation: np.ndarray, resolution: float, window_m: float = RELATIVE_ELEVATION_WINDOW_M
) -> np.ndarray:
    """Elevation minus its mean over a ~``window_m`` square window (valid pixels only).

    Parameters
    ----------
    elevation : np.ndarray
        ``[H, W]`` elevation in metres, NaN where invalid (computed as float32).
    resolution : float
        Pixel size in metres.
    window_m : float
        Window size in metres.

    Returns
    -------
    np.ndarray
        float32 ``[H, W]`` in metres; NaN where the elevation is NaN or the window leaves the
        array.
    """
    z = np.asarray(elevation, dtype=np.float32)
    radius = window_radius_px(resolution, window_m)
    ref = _reference_level(z)
    out = np.empty(z.shape, dtype=np.float32)
    for r0 in range(0, z.shape[0], STRIP_ROWS):
        r1 = min(z.shape[0], r0 + STRIP_ROWS)
        out[r0:r1] = _relative_rows(z, radius, ref, r0, r1)
    return out


def terrain_derivatives(elevation: np.ndarray, resolution: float) -> dict[str, np.ndarray]:
    """All derivatives by their model-facing band names.

    Computed in float32, strip by strip (:data:`STRIP_ROWS` rows plus the rows each derivative
    looks at), so the temporaries are the size of a strip, not of the window; the result does
    not depend on the strip height (up to float32 rounding of the window means).

    Parameters
    ----------
    elevation : np.ndarray
        ``[H, W]`` elevation in metres, NaN where invalid.
    resolution : float
        Pixel size in metres.

    Returns
    -------
    dict[str, np.ndarray]
        ``{"slope": deg, "hillshade": 0..1, "relative_elevation": m}``, float32 ``[H, W]``.
    """
    z = np.asarray(elevation, dtype=np.float32)
    h = z.shape[0]
    radius = window_radius_px(resolution)
    ref = _reference_level(z)
    out = {name: np.empty(z.shape, dtype=np.float32) for name in ("slope", "hillshade", "relative_elevation")}
    for r0 in range(0, h, STRIP_ROWS):
        r1 = min(h, r0 + STRIP_ROWS)
        # gradients need one row either side; rows 0 and h-1 stay NaN (the array border)
        top, bottom = max(0, r0 - 1), min(h, r1 + 1)
        dzdx, dzdy = _gradients(z[top:bottom], resolution)
        rows = slice(r0 - top, r1 - top)
        dzdx, dzdy = dzdx[rows], dzdy[rows]
        out["slope"][r0:r1] = _slope(dzdx, dzdy)
        out["hillshade"][r0:r1] = _hillshade(dzdx, dzdy, HILLSHADE_AZIMUTH_DEG, HILLSHADE_ALTITUDE_DEG)
        out["relative_elevation"][r0:r1] = _relative_rows(z, radius, ref, r0, r1)
    return out
