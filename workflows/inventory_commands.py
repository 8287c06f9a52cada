"""``rtsmap evaluate-inventory``: precision, recall and F1 of an inventory against true polygons.

When the truth's slumps carry an identity through the years (a ``slump_id`` column, as the demo
region's ``truth.gpkg``; another column with ``--truth-id``), the change is scored too
(:func:`rtsmap.pipeline.evaluation.evaluate_change`): the share of true slumps tracked whole,
identity switches, precision/recall/F1 of "new this year" and the error of the area change.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from rtsmap.pipeline.errors import ConfigError
from rtsmap.pipeline.evaluation import evaluate_change, evaluate_inventory, read_truth


def _truth_has_ids(truth: str, truth_id: str) -> bool:
    """Whether every non-empty year of the truth has the identity column (change can be scored)."""
    layers = [t for t in read_truth(truth).values() if len(t)]
    return bool(layers) and all(truth_id in t.columns for t in layers)


def change_lines(change: dict[str, Any], truth_id: str) -> list[str]:
    """The change evaluation (:func:`rtsmap.pipeline.evaluation.evaluate_tracking`) as table lines.

    Parameters
    ----------
    change : dict
        The evaluation.
    truth_id : str
        The truth's identity column (named in the heading).

    Returns
    -------
    list of str
    """
    new, area = change["new"], change["area_change"]
    lines = [
        f"change (true slumps identified by {truth_id!r}; {change['true_slumps_multi_year']} in two or more years):",
        f"  {'tracked whole':<26}{change['tracked_whole']:>8.3f}   (matched every year, always one track_id)",
        f"  {'consistent when matched':<26}{change['consistent_when_matched']:>8.3f}",
        f"  {'identity switches':<26}{change['id_switches']:>8d}",
        f"  {'new slumps':<26}precision {new['precision']:.3f}, recall {new['recall']:.3f}, F1 {new['f1']:.3f} "
        f"({new['tp']} found, {new['fp']} false, {new['fn']} missed)",
    ]
    for year, row in sorted(change["new_by_year"].items()):
        lines.append(f"  {'  ' + year:<26}{row['predicted_new']} predicted new, {row['true_new']} truly new, "
                     f"{row['tp']} right")
    lines.append(f"  {'area change error':<26}mean abs {area['mean_abs_error_m2']:.0f} m2, median abs "
                 f"{area['median_abs_error_m2']:.0f} m2, bias {area['bias_m2']:+.0f} m2 ({area['pairs']} slump-year pairs)")
    lines.append(f"  {'':<26}relative {area['relative_error']:.2f} of the mean abs true change "
                 f"({area['mean_abs_true_change_m2']:.0f} m2)")
    lines.append(f"  {'grown/stable agreement':<26}{area['grown_call_agreement']:>8.3f}")
    return lines


@click.command("evaluate-inventory")
@click.option("--inventory", "inventory", required=True, type=click.Path(dir_okay=False),
              help="Inventory GeoPackage (rts_<year> layers).")
@click.option("--truth", "truth", required=True, type=click.Path(dir_okay=False),
              help="True polygons: a GPKG with rts_<year> layers, or an ARTS-schema file.")
@click.option("--iou", "iou_threshold", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Least IoU for a predicted and a true polygon to match.")
@click.option("--truth-id", "truth_id", default="slump_id", show_default=True,
              help="Column of the truth that identifies a slump through the years; when the truth has it, "
                   "change (tracks, new slumps, area change) is scored too.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def evaluate_inventory_command(inventory: str, truth: str, iou_threshold: float, truth_id: str, as_json: bool) -> None:
    """Match inventory and true polygons one-to-one by IoU; print precision, recall, F1 per year.

    With a truth whose slumps carry an identity (--truth-id, default slump_id), also the change:
    share of true slumps tracked whole, identity switches, precision/recall/F1 of new slumps,
    area-change error. An inventory written without tracks is linked on the fly.
    """
    if not math.isfinite(iou_threshold):  # click's FloatRange lets NaN through (NaN compares false)
        raise ConfigError(f"--iou {iou_threshold}: give a number between 0 and 1")
    if not truth_id.strip():
        raise ConfigError("--truth-id is empty; give the truth's slump identity column, e.g. slump_id")
    for option, path in (("--inventory", inventory), ("--truth", truth)):
        if not Path(path).is_file():
            raise ConfigError(f"{option} {path} does not exist or is not a file")
    results = evaluate_inventory(inventory, truth, iou_threshold=iou_threshold)
    change = (evaluate_change(inventory, truth, truth_id=truth_id, iou_threshold=iou_threshold)
              if _truth_has_ids(truth, truth_id) else None)
    if as_json:
        click.echo(json.dumps({"inventory": str(inventory), "truth": str(truth), "iou_threshold": iou_threshold,
                               "years": {str(y): r.as_dict() for y, r in results.items()},
                               "truth_id": truth_id, "change": change}, indent=2))
        return
    click.echo(f"{'year':>6} {'tp':>6} {'fp':>6} {'fn':>6} {'precision':>10} {'recall':>8} {'f1':>6} {'mean_iou':>9}")
    for y, r in results.items():
        click.echo(f"{y:>6} {r.tp:>6} {r.fp:>6} {r.fn:>6} {r.precision:>10.3f} {r.recall:>8.3f} {r.f1:>6.3f} {r.mean_iou:>9.3f}")
    if change is None:
        click.echo(f"change: not scored (the truth has no {truth_id!r} column; --truth-id names another)")
    else:
        click.echo("")
        for line in change_lines(change, truth_id):
            click.echo(line)
