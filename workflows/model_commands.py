"""``rtsmap train``, ``rtsmap evaluate`` and ``rtsmap export``: the only commands that import torch.

torch and the models package are imported inside the commands, so listing the CLI's commands
stays cheap. Bad input (a missing file, a bad config key) ends as one ``error:`` line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from rtsmap.pipeline.errors import ConfigError, ModelError

# Also reachable from here; the CLI registers it from workflows.training_data (no torch there).
from rtsmap.workflows.training_data import training_data_command  # noqa: F401


@click.command("train")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Training config YAML (see workflows/train_configs/demo.yaml).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from the newest checkpoints and skip finished stages; --no-resume starts over.")
@click.option("--stage", type=click.Choice(["unimodal", "fusion", "all"]), default="all", show_default=True,
              help="unimodal: one model per modality; fusion: the fused model from their checkpoints.")
@click.option("--seed", type=int, default=None, help="Replaces the config's seed (repeat runs of one config).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Replaces the config's output folder (relative to the current directory).")
def train_command(config_path: Path, resume: bool, stage: str, seed: int | None, out_dir: Path | None) -> None:
    """Train the detector: unimodal pretraining, then multimodal fine-tuning (resumable)."""
    from rtsmap.models.train import load_train_config, train

    overrides = {"seed": seed, "out": out_dir and str(out_dir.resolve())}
    try:
        tc = load_train_config(config_path, **{k: v for k, v in overrides.items() if v is not None})
        run = train(tc, stage=stage, resume=resume)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for name, record in run["stages"].items():
        val = (record.get("metrics") or {}).get("val") or {}
        click.echo(f"{name}: {record['steps']} steps, {record['seconds_per_step']} s/step, "
                   f"val segm AP {val.get('segm_AP')}, F1 {val.get('f1')} -> {record['weights']}")


@click.command("evaluate")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="A checkpoint (.safetensors or stage folder) or an exported .onnx model.")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Chip folder written by `rtsmap training-data`.")
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="test", show_default=True)
@click.option("--score-threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Operating point of precision/recall/F1 (default: the model's); choose it on the val split.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate_command(model_path: Path, data_dir: Path, split: str, score_threshold: float | None, as_json: bool) -> None:
    """COCO box/mask AP, AP50, AP75 and F1 at IoU 0.5 of a model on a chip split."""
    from rtsmap.models.evaluate import evaluate_model

    if not model_path.exists():
        raise ModelError(f"model {model_path} does not exist")
    try:
        metrics = evaluate_model(model_path, data_dir, split, score_threshold=score_threshold)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(metrics, indent=1))
        return
    for key, value in metrics.items():
        click.echo(f"{key:>10}: {value:.4f}" if isinstance(value, float) else f"{key:>10}: {value}")


@click.command("export")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="A checkpoint (.safetensors, or a stage folder such as out/fusion).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--opset", default=17, show_default=True, type=int)
@click.option("--trained-on", default=None,
              help="What the model was trained on, for its metadata (default: the chip folder and steps).")
@click.option("--score-threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Operating point stored in the file (default: the checkpoint's, 0.5); "
                   "pick it with `rtsmap evaluate --split val --score-threshold ...`.")
def export_command(checkpoint: Path, out_path: Path, opset: int, trained_on: str | None,
                   score_threshold: float | None) -> None:
    """Export a checkpoint to the ONNX model file the pipeline runs."""
    from rtsmap.models.export import export_onnx
    from rtsmap.models.train import load_detector, read_weights, resolve_checkpoint

    try:
        weights = resolve_checkpoint(checkpoint)
        model = load_detector(weights)
        _, _, meta = read_weights(weights)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    if score_threshold is not None:
        model.config = dataclasses.replace(model.config, score_threshold=score_threshold)
    sidecar = weights.parent / "record.json"
    if trained_on is None:
        trained_on = "untrained"
        if sidecar.is_file():
            record = json.loads(sidecar.read_text())
            trained_on = f"chips {record['train_config']['data']}, {record['steps']} steps ({record['stage']})"
    try:
        export_onnx(model, model.config, out_path, opset=opset, trained_on=trained_on,
                    metadata_extra={"checkpoint": str(weights), "step": int(meta.get("step", 0))})
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    click.echo(f"wrote {out_path} ({model.config.name}, fusion {model.config.fusion}, {model.config.tile_size} px)")
