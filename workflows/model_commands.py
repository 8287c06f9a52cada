"""``rtsmap train``, ``rtsmap evaluate`` and ``rtsmap export``: the only commands that import torch.

torch and the models package are imported inside the commands, so listing the CLI's commands
stays cheap. Bad input (a missing file, a bad config key) ends as one ``error:`` line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import click

from rtsmap.pipeline.errors import ConfigError, ModelError, OutputError
from rtsmap.pipeline.outputs import check_output_file

# Also reachable from here; the CLI registers it from workflows.training_data (no torch there).
from rtsmap.workflows.training_data import training_data_command  # noqa: F401

if TYPE_CHECKING:  # the models package imports torch: only commands that need it load it
    from rtsmap.models.config import ModelConfig


def check_checkpoint(path: Path) -> tuple[Path, ModelConfig]:
    """Resolve a checkpoint and read it once, so a broken file is refused before work starts.

    Parameters
    ----------
    path
        A ``.safetensors`` file, its ``.json`` sidecar, or a stage folder.

    Returns
    -------
    tuple
        The weights file and the model config it was saved with.

    Raises
    ------
    ModelError
        Missing, not a safetensors file (text, truncated), or not an rtsmap checkpoint.
    """
    from safetensors import SafetensorError

    from rtsmap.models.train import read_weights, resolve_checkpoint

    if not path.exists():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        weights = resolve_checkpoint(path)
        _, config, _ = read_weights(weights)
    except (ValueError, KeyError, TypeError, OSError, SafetensorError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelError(f"checkpoint {path} cannot be read as an rtsmap checkpoint ({detail}); "
                         "give a .safetensors file or stage folder written by `rtsmap train`") from None
    return weights, config


def _place(staged: Path, path: Path, *, overwrite: bool) -> None:
    """Move a finished file into place; without overwrite never over a file that appeared meanwhile."""
    if overwrite:
        os.replace(staged, path)
        return
    try:
        os.link(staged, path)  # fails if the target exists: a rename that never replaces
    except FileExistsError:
        raise OutputError(f"--out {path} appeared while exporting; it was not replaced") from None
    staged.unlink()


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
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _check_device(tc.device, config_path)
    out = Path(tc.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"training output {out} is a file; give a folder (`out:` in {config_path} or --out)")
    if not Path(tc.data).is_dir():
        raise ConfigError(f"training config {config_path}: data folder {tc.data} does not exist; "
                          "cut chips with `rtsmap training-data` first")
    try:
        run = train(tc, stage=stage, resume=resume)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for name, record in run["stages"].items():
        val = (record.get("metrics") or {}).get("val") or {}
        click.echo(f"{name}: {record['steps']} steps, {record['seconds_per_step']} s/step, "
                   f"val segm AP {val.get('segm_AP')}, F1 {val.get('f1')} -> {record['weights']}")


def _check_threshold(value: float | None) -> None:
    """click's FloatRange lets NaN through (every comparison with NaN is false)."""
    if value is not None and not math.isfinite(value):
        raise ConfigError(f"--score-threshold {value}: give a number between 0 and 1")


def _check_device(device: str, config_path: Path) -> None:
    """Refuse ``device: cuda`` where torch sees no GPU (torch would fail mid-way with a traceback)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training config {config_path}: device 'cuda' but torch sees no CUDA GPU here; "
                          "use device: cpu (or auto), or run on a GPU machine with a CUDA build of torch")


def _present(modalities, absent: tuple[str, ...]) -> list[str] | None:
    """The model's ``modalities`` left when ``absent`` are removed (None: nothing removed)."""
    if not absent:
        return None
    unknown = sorted(set(absent) - set(modalities))
    if unknown:
        raise ConfigError(f"--without {unknown[0]}: the model's modalities are {list(modalities)}")
    present = [m for m in modalities if m not in absent]
    if not present:
        raise ConfigError("--without: at least one of the model's modalities must be left")
    return present


@click.command("evaluate")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="A checkpoint (.safetensors or stage folder) or an exported .onnx model.")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Chip folder written by `rtsmap training-data`.")
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="test", show_default=True)
@click.option("--score-threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Operating point of precision/recall/F1 (default: the model's); choose it on the val split.")
@click.option("--without", "absent", multiple=True, type=click.Choice(["optical", "sar", "dem"]),
              help="Evaluate as if this modality were missing (repeatable): fed as the zero fill with "
                   "presence 0, as the pipeline does; the model must support the subset left.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate_command(model_path: Path, data_dir: Path, split: str, score_threshold: float | None,
                     absent: tuple[str, ...], as_json: bool) -> None:
    """COCO box/mask AP, AP50, AP75 and F1 at IoU 0.5 of a model on a chip split."""
    from rtsmap.models.evaluate import evaluate_model

    _check_threshold(score_threshold)

    if not model_path.exists():
        raise ModelError(f"model {model_path} does not exist")
    if not data_dir.is_dir():
        raise ConfigError(f"--data {data_dir} is not a folder; cut chips with `rtsmap training-data` first")
    if model_path.suffix.lower() == ".onnx":
        from rtsmap.pipeline.model_file import read_model_info

        # ModelError for a text, truncated or foreign file
        modalities = read_model_info(model_path).modalities
    else:
        modalities = check_checkpoint(model_path)[1].modalities
    present = _present(modalities, absent)
    try:
        metrics = evaluate_model(model_path, data_dir, split, score_threshold=score_threshold, present=present)
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
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="The .onnx file to write (never replaced without --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--opset", default=17, show_default=True, type=int)
@click.option("--trained-on", default=None,
              help="What the model was trained on, for its metadata (default: the chip folder and steps).")
@click.option("--score-threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Operating point stored in the file (default: the checkpoint's, 0.5); "
                   "pick it with `rtsmap evaluate --split val --score-threshold ...`.")
def export_command(checkpoint: Path, out_path: Path, overwrite: bool, opset: int, trained_on: str | None,
                   score_threshold: float | None) -> None:
    """Export a checkpoint to the ONNX model file the pipeline runs."""
    from rtsmap.models.export import export_onnx
    from rtsmap.models.train import load_detector, read_weights

    _check_threshold(score_threshold)
    check_output_file(out_path, overwrite=overwrite, suffix=".onnx")
    if not 7 <= opset <= 23:
        raise ConfigError(f"--opset {opset}: use an ONNX opset between 7 and 23 (default 17)")
    weights, _ = check_checkpoint(checkpoint)
    try:
        model = load_detector(weights)
        _, _, meta = read_weights(weights)
    except (ValueError, RuntimeError, KeyError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ModelError(f"checkpoint {checkpoint} does not fit its own model config ({detail})") from None
    if score_threshold is not None:
        model.config = dataclasses.replace(model.config, score_threshold=score_threshold)
    sidecar = weights.parent / "record.json"
    if trained_on is None:
        trained_on = "untrained"
        if sidecar.is_file():
            try:
                record = json.loads(sidecar.read_text())
                trained_on = f"chips {record['train_config']['data']}, {record['steps']} steps ({record['stage']})"
            except (ValueError, KeyError, TypeError):
                trained_on = "unknown (unreadable record.json)"
    # Exported beside the target under a hidden name, then moved into place: a failed or killed
    # export never leaves a partial file under --out, and never replaces one without --overwrite.
    staged = out_path.with_name(f".{out_path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.onnx")
    try:
        export_onnx(model, model.config, staged, opset=opset, trained_on=trained_on,
                    metadata_extra={"checkpoint": str(weights), "step": int(meta.get("step", 0))})
        _place(staged, out_path, overwrite=overwrite)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    finally:
        staged.unlink(missing_ok=True)
    click.echo(f"wrote {out_path} ({model.config.name}, fusion {model.config.fusion}, {model.config.tile_size} px)")
