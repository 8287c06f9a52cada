"""A PNG map per year next to the GeoPackage: people look at maps before they read tables.

Each map shows the coverage (processed, no data, failed) and the slumps on top, with the
hillshade of the DEM underneath where the run kept one (see ``workflows.tasks``).
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np

COVERAGE_STYLE = {
    "processed": {"facecolor": "#e8efe4", "edgecolor": "none", "label": "processed"},
    "no_data": {"facecolor": "#bdbdbd", "edgecolor": "none", "hatch": "///", "label": "no data"},
    "failed": {"facecolor": "#f4a6a6", "edgecolor": "#c62828", "label": "failed"},
}


def write_quicklooks(
    out: Path,
    layers: dict[int, gpd.GeoDataFrame],
    coverage: dict[int, gpd.GeoDataFrame],
    hillshade: dict[int, tuple[np.ndarray, tuple[float, float, float, float]]] | None = None,
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
        Optional year -> (array, (left, right, bottom, top)) drawn underneath.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    paths = []
    for year, slumps in sorted(layers.items()):
        fig, ax = plt.subplots(figsize=(7, 7), dpi=110)
        cov = coverage.get(year)
        if hillshade and year in hillshade:
            image, extent = hillshade[year]
            ax.imshow(image, cmap="gray", extent=extent, vmin=0, vmax=1, interpolation="nearest")
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
        if len(slumps):
            slumps.plot(ax=ax, facecolor="#ff6f00", edgecolor="#b71c1c", linewidth=0.6)
        handles.append(Patch(facecolor="#ff6f00", edgecolor="#b71c1c", label=f"RTS ({len(slumps)})"))
        ax.legend(handles=handles, loc="lower right", fontsize=8)
        ax.set_title(f"Retrogressive thaw slumps {year}")
        ax.set_xlabel(f"x ({slumps.crs.to_string() if slumps.crs else ''}, m)")
        ax.set_aspect("equal")
        ax.ticklabel_format(style="plain", useOffset=False)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}_{year}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
