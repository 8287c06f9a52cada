"""``rtsmap evaluate-inventory``: precision, recall and F1 of an inventory against true polygons."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from rtsmap.pipeline.errors import ConfigError
from rtsmap.pipeline.evaluation import evaluate_inventory


@click.command("evaluate-inventory")
@click.option("--inventory", "inventory", required=True, type=click.Path(dir_okay=False),
              help="Inventory GeoPackage (rts_<year> layers).")
@click.option("--truth", "truth", required=True, type=click.Path(dir_okay=False),
              help="True polygons: a GPKG with rts_<year> layers, or an ARTS-schema file.")
@click.option("--iou", "iou_threshold", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Least IoU for a predicted and a true polygon to match.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def evaluate_inventory_command(inventory: str, truth: str, iou_threshold: float, as_json: bool) -> None:
    """Match inventory and true polygons one-to-one by IoU; print precision, recall, F1 per year."""
    if not math.isfinite(iou_threshold):  # click's FloatRange lets NaN through (NaN compares false)
        raise ConfigError(f"--iou {iou_threshold}: give a number between 0 and 1")
    for option, path in (("--inventory", inventory), ("--truth", truth)):
        if not Path(path).is_file():
            raise ConfigError(f"{option} {path} does not exist or is not a file")
    results = evaluate_inventory(inventory, truth, iou_threshold=iou_threshold)
    if as_json:
        click.echo(json.dumps({"inventory": str(inventory), "truth": str(truth), "iou_threshold": iou_threshold,
                               "years": {str(y): r.as_dict() for y, r in results.items()}}, indent=2))
        return
    click.echo(f"{'year':>6} {'tp':>6} {'fp':>6} {'fn':>6} {'precision':>10} {'recall':>8} {'f1':>6} {'mean_iou':>9}")
    for y, r in results.items():
        click.echo(f"{y:>6} {r.tp:>6} {r.fp:>6} {r.fn:>6} {r.precision:>10.3f} {r.recall:>8.3f} {r.f1:>6.3f} {r.mean_iou:>9.3f}")
