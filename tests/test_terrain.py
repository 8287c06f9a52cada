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


def reference_derivatives(z: np.ndarray, resolution: float) -> dict[str, np.ndarray]:
    """The derivatives in float64, written plainly (a brute-force window mean per pixel)."""
    z = z.astype(np.float64)
    h, w = z.shape
    dzdx = np.full(z.shape, np.nan)
    dzdy = np.full(z.shape, np.nan)
    dzdx[:, 1:-1] = (z[:, 2:] - z[:, :-2]) / (2 * resolution)
    dzdy[1:-1, :] = (z[:-2, :] - z[2:, :]) / (2 * resolution)
    slope = np.degrees(np.arctan(np.hypot(dzdx, dzdy)))
    az, alt = np.radians(315.0), np.radians(45.0)
    shade = (-dzdx * np.cos(alt) * np.sin(az) - dzdy * np.cos(alt) * np.cos(az) + np.sin(alt))
    shade = np.clip(shade / np.sqrt(1 + dzdx**2 + dzdy**2), 0, 1)
    r = terrain.window_radius_px(resolution)
    rel = np.full(z.shape, np.nan)
    for i in range(r, h - r):
        for j in range(r, w - r):
            if np.isfinite(z[i, j]):
                rel[i, j] = z[i, j] - np.nanmean(z[i - r : i + r + 1, j - r : j + r + 1])
    return {"slope": slope, "hillshade": shade, "relative_elevation": rel}


def rough_dem(n: int = 90) -> np.ndarray:
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    z = 1200 + 40 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + np.cumsum(rng.normal(0, 0.8, (n, n)), 1)
    z[40:44, 50:53] = np.nan  # a nodata hole
    return z.astype(np.float32)  # the loader's elevation is float32


def test_float32_derivatives_equal_a_float64_reference():
    z = rough_dem()
    got = terrain.terrain_derivatives(z, RES)
    want = reference_derivatives(z, RES)
    for name, tolerance in (("slope", 1e-4), ("hillshade", 1e-6), ("relative_elevation", 1e-4)):
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(want[name]), err_msg=name)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=tolerance, err_msg=name)
    assert np.isfinite(got["relative_elevation"]).sum() > 1000


def test_strips_do_not_change_the_result(monkeypatch):
    z = rough_dem()
    whole = terrain.terrain_derivatives(z, RES)  # 90 rows: one strip
    monkeypatch.setattr(terrain, "STRIP_ROWS", 7)  # strips smaller than the window radius
    strips = terrain.terrain_derivatives(z, RES)
    for name in whole:
        np.testing.assert_allclose(strips[name], whole[name], rtol=1e-6, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(np.isnan(strips[name]), np.isnan(whole[name]))
    np.testing.assert_allclose(terrain.relative_elevation(z, RES), whole["relative_elevation"], rtol=1e-6, atol=1e-5)
