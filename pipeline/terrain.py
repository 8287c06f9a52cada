"""Terrain derivatives of a DEM: slope, hillshade and relative elevation.

Plain numpy on one array in a projected CRS with square pixels. Every derivative looks at a
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
    """dz/dx (east) and dz/dy (north) by central differences, NaN on the array border.

    The border is NaN rather than a one-sided difference so that a value is either exact or
    absent: an exact value never depends on where the array happens to end.
    """
    z = elevation.astype(np.float64, copy=False)
    dzdx = np.full(z.shape, np.nan)
    dzdy = np.full(z.shape, np.nan)
    dzdx[:, 1:-1] = (z[:, 2:] - z[:, :-2]) / (2.0 * resolution)
    # rows grow southward, so north is minus the row direction
    dzdy[1:-1, :] = (z[:-2, :] - z[2:, :]) / (2.0 * resolution)
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
    return np.degrees(np.arctan(np.hypot(dzdx, dzdy))).astype(np.float32)


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
    # normal (-dz/dx, -dz/dy, 1).
    sun_e, sun_n, sun_u = np.cos(alt) * np.sin(az), np.cos(alt) * np.cos(az), np.sin(alt)
    shade = (-dzdx * sun_e - dzdy * sun_n + sun_u) / np.sqrt(1.0 + dzdx**2 + dzdy**2)
    return np.clip(shade, 0.0, 1.0).astype(np.float32)


def _box_sum(values: np.ndarray, radius: int) -> np.ndarray:
    """Sum over the ``(2r+1)^2`` window around each pixel, NaN where the window leaves the array.

    Written with an integral image because numpy has no box filter (scipy is not a dependency);
    NaN near the border keeps every value exact or absent, as in :func:`_gradients`.
    """
    h, w = values.shape
    k = 2 * radius + 1
    out = np.full((h, w), np.nan)
    if h < k or w < k:
        return out
    integral = np.zeros((h + 1, w + 1))
    np.cumsum(np.cumsum(values, axis=0), axis=1, out=integral[1:, 1:])
    window = integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]
    out[radius : h - radius, radius : w - radius] = window
    return out


def relative_elevation(
    elevation: np.ndarray, resolution: float, window_m: float = RELATIVE_ELEVATION_WINDOW_M
) -> np.ndarray:
    """Elevation minus its mean over a ~``window_m`` square window (valid pixels only).

    Parameters
    ----------
    elevation : np.ndarray
        ``[H, W]`` elevation in metres, NaN where invalid.
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
    radius = window_radius_px(resolution, window_m)
    z = elevation.astype(np.float64)
    valid = np.isfinite(z)
    # Subtract one reference level so the integral image sums small numbers (better precision
    # and the same rounding for any window position).
    ref = float(np.nanmedian(z)) if valid.any() else 0.0
    centred = np.where(valid, z - ref, 0.0)
    total = _box_sum(centred, radius)
    count = _box_sum(valid.astype(np.float64), radius)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    rel = np.where(valid & (count > 0), (z - ref) - mean, np.nan)
    return rel.astype(np.float32)


def terrain_derivatives(elevation: np.ndarray, resolution: float) -> dict[str, np.ndarray]:
    """All derivatives by their model-facing band names.

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
    # gradients once for both slope and hillshade (two float64 arrays the size of the window)
    dzdx, dzdy = _gradients(elevation, resolution)
    out = {
        "slope": _slope(dzdx, dzdy),
        "hillshade": _hillshade(dzdx, dzdy, HILLSHADE_AZIMUTH_DEG, HILLSHADE_ALTITUDE_DEG),
    }
    del dzdx, dzdy
    out["relative_elevation"] = relative_elevation(elevation, resolution)
    return out
