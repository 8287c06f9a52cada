"""Tests for pipeline.terrain: slope, hillshade and relative elevation on known surfaces."""

from __future__ import annotations

import numpy as np

from rtsmap.pipeline import terrain

RES = 10.0


def plane(gx: float, gy: float, n: int = 50) -> np.ndarray:
    """Elevation rising ``gx`` m/m eastward and ``gy`` m/m northward."""
    rows, cols = np.mgrid[0:n, 0:n].astype(np.float64)
    return 100.0 + gx * cols * RES - gy * rows * RES  # rows grow southward


def test_slope_of_a_plane():
    slope = terrain.slope_degrees(plane(0.3, 0.4), RES)  # gradient magnitude 0.5
    inner = slope[1:-1, 1:-1]
    np.testing.assert_allclose(inner, np.degrees(np.arctan(0.5)), atol=1e-4)
    assert np.isnan(slope[0]).all() and np.isnan(slope[:, -1]).all()


def test_hillshade_flat_and_facing_the_sun():
    flat = terrain.hillshade(plane(0.0, 0.0), RES)[1:-1, 1:-1]
    np.testing.assert_allclose(flat, np.sin(np.radians(45.0)), atol=1e-6)
    # the default sun is in the north-west: a slope rising to the south-east faces it
    facing = terrain.hillshade(plane(0.5, -0.5), RES)[5, 5]
    away = terrain.hillshade(plane(-0.5, 0.5), RES)[5, 5]
    steep_away = terrain.hillshade(plane(-5.0, 5.0), RES)[5, 5]
    assert facing > flat[0, 0] > away >= 0.0
    assert steep_away == 0.0  # self-shadowed, clipped to 0


def test_relative_elevation_plane_is_zero_and_pit_is_negative():
    z = plane(0.2, 0.1, n=80)
    rel = terrain.relative_elevation(z, RES)
    r = terrain.window_radius_px(RES)
    assert r == 15  # 31 px x 10 m ~ 300 m
    np.testing.assert_allclose(rel[r:-r, r:-r], 0.0, atol=1e-4)  # a plane equals its local mean
    assert np.isnan(rel[: r]).all()
    z[40, 40] -= 31.0**2  # a pit; the window mean drops by 1 m
    rel = terrain.relative_elevation(z, RES)
    np.testing.assert_allclose(rel[40, 40], -(31.0**2) + 1.0, atol=1e-3)
    np.testing.assert_allclose(rel[40, 45], 1.0, atol=1e-3)


def test_nan_elevation_is_ignored_by_the_mean_and_marks_neighbours():
    z = plane(0.0, 0.0, n=60)
    z[30, 30] = np.nan
    rel = terrain.relative_elevation(z, RES)
    assert np.isnan(rel[30, 30]) and np.isfinite(rel[30, 31])
    np.testing.assert_allclose(rel[30, 31], 0.0, atol=1e-5)
    slope = terrain.slope_degrees(z, RES)
    assert np.isnan(slope[30, 31]) and np.isnan(slope[29, 30]) and np.isfinite(slope[30, 32])


def test_derivatives_on_sub_windows_equal_those_on_the_whole():
    rng = np.random.default_rng(0)
    z = 500 + np.cumsum(np.cumsum(rng.normal(0, 0.3, (120, 120)), 0), 1)
    whole = terrain.terrain_derivatives(z, RES)
    buffer = terrain.required_buffer_px(RES) + 1
    sub = terrain.terrain_derivatives(z[20:100, 30:110], RES)
    for name in ("slope", "hillshade", "relative_elevation"):
        inner_sub = sub[name][buffer:-buffer, buffer:-buffer]
        inner_whole = whole[name][20 + buffer : 100 - buffer, 30 + buffer : 110 - buffer]
        np.testing.assert_allclose(inner_sub, inner_whole, rtol=1e-5, atol=1e-4)
        assert inner_sub.dtype == np.float32 and np.isfinite(inner_sub).all()
