"""PNG maps next to the GeoPackage: people look at maps before they read tables.

Per year (``<out stem>_<year>.png``): the coverage (processed, no data, failed) and the slumps
on top, with the hillshade of the DEM underneath where the run kept one (see
``workflows.tasks``). Per pair of consecutive years (``<out stem>_change_<year0>-<year1>.png``):
the later year's coverage and its slumps coloured by change (new, grown, unchanged), with the
earlier year's slumps that are no longer seen as outlines (``pipeline.inventory.change_classes``
and ``no_longer_seen``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import geopandas as gpd
import numpy as np
from affine import Affine

from rtsmap.pipeline.errors import OutputError

COVERAGE_STYLE = {
    "processed": {"facecolor": "#e8efe4", "edgecolor": "none", "label": "processed"},
    "no_data": {"facecolor": "#bdbdbd", "edgecolor": "none", "hatch": "///", "label": "no data"},
    "failed": {"facecolor": "#f4a6a6", "edgecolor": "#c62828", "label": "failed"},
}


def mosaic_thumbnails(thumbnails: list[tuple[np.ndarray, Affine]]) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Paste chunk thumbnails of one pixel size into one image; returns it and its extent.

    Chunks lie on the globally anchored grid, so their thumbnails line up on whole pixels and
    a paste by offset is exact (no resampling); overlapping borders hold the same values.
    """
    size = thumbnails[0][1].a
    left = min(t.c for _, t in thumbnails)
    top = max(t.f for _, t in thumbnails)
    right = max(t.c + img.shape[1] * size for img, t in thumbnails)
    bottom = min(t.f - img.shape[0] * size for img, t in thumbnails)
    canvas = np.full((round((top - bottom) / size), round((right - left) / size)), np.nan, dtype=np.float32)
    for image, transform in thumbnails:
        row, col = round((top - transform.f) / size), round((transform.c - left) / size)
        canvas[row : row + image.shape[0], col : col + image.shape[1]] = image
    return canvas, (left, right, bottom, top)


def quicklook_paths(out: str | os.PathLike, years) -> list[Path]:
    """The PNG paths the quick-looks of ``out`` take: ``<out stem>_<year>.png`` beside it.

    Parameters
    ----------
    out
        The GeoPackage path.
    years
        The years of the run.

    Returns
    -------
    list of pathlib.Path
    """
    out = Path(out)
    return [out.with_name(f"{out.stem}_{int(year)}.png") for year in sorted(years)]


def change_quicklook_paths(out: str | os.PathLike, years) -> list[Path]:
    """The PNG paths of the change quick-looks: ``<out stem>_change_<year0>-<year1>.png`` beside it.

    Parameters
    ----------
    out
        The GeoPackage path.
    years
        The years of the run (one PNG per pair of consecutive years).

    Returns
    -------
    list of pathlib.Path
    """
    out = Path(out)
    ys = sorted(int(y) for y in years)
    return [out.with_name(f"{out.stem}_change_{a}-{b}.png") for a, b in zip(ys, ys[1:])]


def check_quicklooks(out: str | os.PathLike, years, *, overwrite: bool, change: bool = True) -> None:
    """Refuse, before work starts, quick-look paths that exist (unless ``overwrite``).

    Parameters
    ----------
    out
        The GeoPackage path.
    years
        The years of the run.
    overwrite
        Existing PNGs may be replaced.
    change
        Check the change quick-looks' paths too (:func:`change_quicklook_paths`).

    Raises
    ------
    OutputError
        A PNG of one of the years (or pairs of years) exists (e.g. the user's own
        ``OUT_2021.png``) or is a folder.
    """
    paths = quicklook_paths(out, years) + (change_quicklook_paths(out, years) if change else [])
    for path in paths:
        if path.is_dir() or (path.exists() and not overwrite):
            raise OutputError(f"quick-look {path} already exists; pass --overwrite to replace it, "
                              "or choose another --out")


def place_png(path: Path, write, *, overwrite: bool) -> None:
    """Write a PNG under a temporary name beside ``path`` (``write(tmp)``), then rename it.

    Parameters
    ----------
    path
        The quick-look's final path.
    write
        ``write(tmp_path)`` writes the PNG (draws a figure, or copies a staged file).
    overwrite
        Replace ``path``; without it a file that appeared meanwhile is never replaced.

    Raises
    ------
    OutputError
        The file appeared meanwhile (without ``overwrite``), or it cannot be written.
    """
    # Not mkstemp: its files are 0600, and a quick-look is an output others read (the mode
    # follows the umask, as the GeoPackage's does). O_EXCL keeps the name unique.
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp.png"))
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise OutputError(f"quick-look {path}: cannot write ({exc.strerror or exc}); "
                          "check the free disk space and permissions") from None
    try:
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the file appeared meanwhile: never replaced
            except FileExistsError:
                raise OutputError(f"quick-look {path} appeared while writing; it was not replaced") from None
    except OSError as exc:
        raise OutputError(f"quick-look {path}: cannot write ({exc.strerror or exc}); "
                          "check the free disk space and permissions") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _save_png(fig, path: Path, overwrite: bool) -> None:
    """Save under a temporary name, then rename; without overwrite never over an existing file."""
    # zlib level 1: a third of the save time of the default 6, for a slightly larger file.
    place_png(path, lambda tmp: fig.savefig(tmp, format="png", pil_kwargs={"compress_level": 1}),
              overwrite=overwrite)


def prepare_pyplot():
    """matplotlib's pyplot on the Agg backend (imported once: ~0.4 s); returns the module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt



def _base_map(plt, cov, hillshade, title: str):
    """A figure with the hillshade, the coverage and the axes in km; returns (fig, ax, legend handles)."""
    import matplotlib.ticker
    from matplotlib.patches import Patch

    # Fixed margins instead of a layout engine: "tight" measured every tick label in an extra
    # layout pass (a third of a map's time). geopandas' plot() ends in canvas.draw_idle(), which
    # on Agg renders the whole figure each time: drawn once, at save.
    fig, ax = plt.subplots(figsize=(7, 7), dpi=110)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.08, top=0.95)
    fig.canvas.draw_idle = lambda *args, **kwargs: None
    if hillshade is not None:
        image, extent = hillshade
        # Stretch to the scene's own range: low Arctic relief gives a flat grey at 0..1.
        low, high = np.nanpercentile(image, [2, 98]) if np.isfinite(image).any() else (0.0, 1.0)
        ax.imshow(image, cmap="gray", extent=extent, vmin=low, vmax=max(high, low + 1e-3), interpolation="nearest")
        alpha = 0.35
    else:
        alpha = 1.0
    handles = []
    if cov is not None and len(cov):
        for status, style in COVERAGE_STYLE.items():
            part = cov[cov["status"] == status]
            if len(part):
                part.plot(ax=ax, alpha=alpha, **{k: v for k, v in style.items() if k != "label"})
                handles.append(Patch(**style))
        # Frame the processed area, not the whole hillshade canvas (chunk windows reach past the AOI).
        minx, miny, maxx, maxy = cov.total_bounds
        pad = 0.03 * max(maxx - minx, maxy - miny)
        ax.set_xlim(minx - pad, maxx + pad)
        ax.set_ylim(miny - pad, maxy + pad)
    ax.set_title(title)
    ax.set_aspect("equal")
    km = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}")
    ax.xaxis.set_major_formatter(km)
    ax.yaxis.set_major_formatter(km)
    return fig, ax, handles


def _finish_map(plt, fig, ax, handles, crs, path: Path, overwrite: bool) -> None:
    crs = crs.to_string() if crs else ""
    ax.set_xlabel(f"x (km, {crs})")
    ax.set_ylabel(f"y (km, {crs})")
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    try:
        _save_png(fig, path, overwrite)
    finally:
        plt.close(fig)


def write_quicklooks(
    out: Path,
    layers: dict[int, gpd.GeoDataFrame],
    coverage: dict[int, gpd.GeoDataFrame],
    hillshade: tuple[np.ndarray, tuple[float, float, float, float]] | None = None,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``<out stem>_<year>.png`` for each year and return the paths.

    Parameters
    ----------
    out
        The GeoPackage path; the PNGs go beside it.
    layers
        Year -> merged slumps.
    coverage
        Year -> coverage polygons with a ``status`` column.
    hillshade
        Optional (array, (left, right, bottom, top)) drawn underneath every year's map.
    overwrite
        Replace PNGs that exist; without it an existing PNG is an error (checked for every
        year before any is written) and is never replaced.

    Returns
    -------
    list of pathlib.Path
        The PNGs written.

    Raises
    ------
    OutputError
        A PNG exists and ``overwrite`` is False, or one cannot be written.
    """
    check_quicklooks(out, layers, overwrite=overwrite, change=False)
    from matplotlib.patches import Patch

    plt = prepare_pyplot()
    paths = []
    for year, slumps in sorted(layers.items()):
        fig, ax, handles = _base_map(plt, coverage.get(year), hillshade, f"Retrogressive thaw slumps {year}")
        if len(slumps):
            slumps.plot(ax=ax, facecolor="#ff6f00", edgecolor="#b71c1c", linewidth=0.6)
        handles.append(Patch(facecolor="#ff6f00", edgecolor="#b71c1c", label=f"RTS ({len(slumps)})"))
        path = out.with_name(f"{out.stem}_{year}.png")
        _finish_map(plt, fig, ax, handles, slumps.crs, path, overwrite)
        paths.append(path)
    return paths


#: How each change class is drawn (Okabe-Ito colours, told apart with colour-blindness too).
CHANGE_STYLE = {
    "new": {"facecolor": "#d55e00", "edgecolor": "#6b2f00", "label": "new"},
    "first_seen": {"facecolor": "#d55e00", "edgecolor": "#6b2f00", "hatch": "....",
                   "label": "first seen (no data before)"},
    "grown": {"facecolor": "#f0e442", "edgecolor": "#6b6400", "label": "grown"},
    "unchanged": {"facecolor": "#0072b2", "edgecolor": "#003a5c", "label": "unchanged"},
    "no_longer_seen": {"facecolor": "none", "edgecolor": "#000000", "linestyle": "--",
                       "label": "no longer seen"},
}


def write_change_quicklooks(
    out: str | os.PathLike,
    layers: dict[int, gpd.GeoDataFrame],
    coverage: dict[int, gpd.GeoDataFrame],
    hillshade: tuple[np.ndarray, tuple[float, float, float, float]] | None = None,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``<out stem>_change_<year0>-<year1>.png`` per pair of consecutive years.

    Each map shows the later year's coverage over the hillshade, its slumps filled by change
    (new, grown, unchanged; "first seen" where no earlier year saw the ground) and, as dashed
    outlines, the earlier year's slumps no longer seen (ground processed, track not continued).

    Parameters
    ----------
    out
        The GeoPackage path; the PNGs go beside it.
    layers
        Year -> linked slumps (``pipeline.tracks.link_years`` output, or the inventory's
        ``rts_<year>`` layers): ``track_id``, ``change``, ``area_change_m2``, ``UID``,
        ``MergedRTS``.
    coverage
        Year -> coverage polygons with a ``status`` column.
    hillshade
        Optional (array, (left, right, bottom, top)) drawn underneath.
    overwrite
        Replace PNGs that exist; without it an existing PNG is an error (checked for every
        pair before any is written) and is never replaced.

    Returns
    -------
    list of pathlib.Path
        The PNGs written (none for a single year).

    Raises
    ------
    OutputError
        A PNG exists and ``overwrite`` is False, one cannot be written, or a layer is not
        linked (no ``change`` column).
    """
    from matplotlib.patches import Patch

    from rtsmap.pipeline.inventory import change_classes, no_longer_seen

    out = Path(out)
    years = sorted(int(y) for y in layers)
    for year in years:
        if len(layers[year]) and "change" not in layers[year].columns:
            raise OutputError(f"change quick-look: the slumps of {year} are not linked (no change column); "
                              "link them with pipeline.tracks.link_years first")
    paths = change_quicklook_paths(out, years)
    for path in paths:
        if path.is_dir() or (path.exists() and not overwrite):
            raise OutputError(f"quick-look {path} already exists; pass --overwrite to replace it, "
                              "or choose another --out")
    plt = prepare_pyplot()
    for (before, year), path in zip(zip(years, years[1:]), paths):
        slumps, previous = layers[year], layers[before]
        fig, ax, handles = _base_map(plt, coverage.get(year), hillshade, f"Slump change {before} \u2192 {year}")
        classes = change_classes(slumps)
        gone = no_longer_seen(previous, slumps, coverage.get(year))
        for name, style in CHANGE_STYLE.items():
            part = previous[gone] if name == "no_longer_seen" else slumps[classes == name]
            if name == "first_seen" and not len(part):
                continue  # only when some ground had no earlier look
            if len(part):
                part.plot(ax=ax, linewidth=1.4 if name == "no_longer_seen" else 0.6,
                          **{k: v for k, v in style.items() if k != "label"})
            handles.append(Patch(**{**style, "label": f"{style['label']} ({len(part)})"}))
        _finish_map(plt, fig, ax, handles, slumps.crs or previous.crs, path, overwrite)
    return paths
