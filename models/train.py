"""Two-stage training of the RTS detector: unimodal pretraining, then multimodal fine-tuning.

Stage 1 trains one detector per modality (``fusion="none"``: its own MViTv2 + FPN + heads).
Stage 2 builds the fused model from the three unimodal checkpoints: each backbone branch from
its modality's checkpoint (``MultimodalBackbone.load_unimodal_state``), the RPN and cascade heads
from the optical model. With the residual attention fusion, whose gates start at zero, the
fused model at step 0 IS the optical model; fine-tuning lets SAR and DEM in as far as they help.
Data-level fusion (one backbone on all bands) starts from the optical checkpoint too, its stem
widened with zero weights for the SAR and DEM bands, so every fused model in the comparison
starts from the same point and gets the same fine-tuning budget.
The backbones can be frozen for the first steps so the new fusion layers settle first.

Modality dropout (``modality_dropout``, stage 2 only): each chip's optical, SAR or DEM is fed as
absent at its own rate, never all of a chip's modalities: its input becomes the zero fill and
its presence flag 0 (``models/data.py``: ``draw_presence``, ``apply_presence``), drawn from a
generator seeded by (seed, step) so a resumed run drops the same ones. The fused model records
the subsets it was trained for (``ModelConfig.modality_subsets``), which the exported file lists
for the pipeline; its validation metrics are also given with each single modality absent.

Optimiser: AdamW (no weight decay on norms, biases, gates and embeddings), linear warmup then
cosine decay, gradient clipping. The learning rate is a pure function of the step, so a resumed
run follows the same schedule.

Checkpoints (one folder per stage, under ``TrainConfig.out``)::

    step_000120.safetensors   the model's state dict (safetensors: tensors only, nothing is
                              unpickled); its metadata holds the ModelConfig JSON
    step_000120.optim.pt      AdamW state (torch.save; read back with weights_only=True)
    step_000120.json          sidecar, written last: step, configs, timings, file names
    model.safetensors         final weights (what `rtsmap export` takes)
    record.json               config, seed, wall time, seconds/step, final metrics

A checkpoint counts once its sidecar exists; rerunning the same command resumes from the newest
one, with the same batches (data order and augmentations are functions of seed and step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, Mapping

import annotated_types as at
import numpy as np
import torch
from safetensors import safe_open
from pydantic import AfterValidator
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from rtsmap.config_schema import (
    Bool,
    Float,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Str,
    read_yaml,
    schema,
    validate,
)
from rtsmap.errors import ConfigError
from rtsmap.models.config import DEFAULT_NORMALIZATION, FUSION_MODES, MODEL_VARIANTS, ModelConfig, build_config
from rtsmap.contract import modality_subsets
from rtsmap.models.data import Augment, ChipDataset, apply_presence, collate, draw_presence, read_manifest
from rtsmap.models.detector import RTSDetector

log = logging.getLogger(__name__)

#: Key of the ModelConfig JSON in a checkpoint's safetensors metadata.
CONFIG_KEY = "rtsmap_model_config"

STAGES = ("unimodal", "fusion", "all")

#: ModelConfig fields each stage sets itself (from the chips and the stage), never model_overrides.
STAGE_SET_FIELDS = ("name", "fusion", "modalities", "normalization", "tile_size", "resolution", "modality_subsets")


def _known_variant(name: str) -> str:
    if name not in MODEL_VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; choose one of {', '.join(sorted(MODEL_VARIANTS))}")
    return name


def _model_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Each override must be a ModelConfig field that no stage sets, with a value of its type."""
    hints = typing.get_type_hints(ModelConfig, include_extras=True)
    checked = {}
    for key, value in overrides.items():
        if key in STAGE_SET_FIELDS:
            raise ValueError(f"{key}: is set by each stage (from the chips and the stage), not by model_overrides")
        if key not in hints:
            known = sorted(set(hints) - set(STAGE_SET_FIELDS))
            raise ValueError(f"unknown key {key!r} (known: {', '.join(known)})")
        try:
            checked[key] = validate(hints[key], value, None)
        except ConfigError as exc:
            raise ValueError(f"{key}: {exc}") from None
    return checked


Variant = Annotated[Str, AfterValidator(_known_variant)]
DropoutRate = Annotated[Float, at.Ge(0), at.Lt(1)]
"""A modality dropout rate: 1 would drop the modality always, so the model never saw it."""
FusionMode = Literal[FUSION_MODES]
ModelOverrides = Annotated[dict[Str, Any], AfterValidator(_model_overrides)]


@schema
@dataclass(frozen=True)
class TrainConfig:
    """A training run (both stages). Read from YAML by :func:`load_train_config`."""

    data: Str
    """Chip folder written by ``rtsmap training-data`` (relative paths: from the YAML file)."""
    out: Str
    """Output folder: one subfolder per stage (relative paths: from the YAML file)."""
    model: Variant = "demo"
    """Model variant, a key of ``models.config.MODEL_VARIANTS``."""
    model_overrides: ModelOverrides = field(default_factory=dict)
    """ModelConfig fields replaced in every stage (tile size and resolution come from the chips)."""
    modalities: Annotated[tuple[Str, ...], at.MinLen(1)] = ("optical", "sar", "dem")
    """Modalities, the fusion query (optical) first; stage 1 trains one model per entry."""
    fusion: FusionMode = "residual_attention"
    """Fusion of stage 2."""
    unimodal_from: Str | None = None
    """Folder of another run whose ``unimodal_<modality>`` checkpoints stage 2 starts from (stage
    1 is then not run here): how fusion modes are compared from the same pretraining. Relative
    paths: from the YAML file."""
    normalization: Literal["dataset", "default"] = "dataset"
    """``dataset``: band statistics of the train chips (dataset.json); ``default``: the model's defaults."""
    seed: NonNegativeInt = 0
    """Seed of weights, data order and augmentations."""
    batch_size: PositiveInt = 2
    """Chips per step."""
    unimodal_steps: NonNegativeInt = 300
    """Optimizer steps of each unimodal model."""
    fusion_steps: NonNegativeInt = 300
    """Optimizer steps of the fused model."""
    lr: PositiveFloat = 2e-4
    """Peak learning rate of stage 1."""
    fusion_lr: PositiveFloat = 1e-4
    """Peak learning rate of stage 2 (lower: it starts from trained weights)."""
    weight_decay: NonNegativeFloat = 0.05
    """AdamW weight decay of matrices and convolution kernels."""
    gate_lr_scale: PositiveFloat = 1.0
    """Learning-rate multiplier of the residual fusion gates. They start at zero and must grow to
    order one for the fused model to use SAR and DEM; at the backbone's rate they barely move."""
    warmup_steps: NonNegativeInt = 20
    """Linear warmup steps (from 1% of the peak)."""
    min_lr_ratio: Fraction = 0.05
    """Learning rate at the end of the cosine, relative to the peak."""
    grad_clip: NonNegativeFloat = 1.0
    """Largest global gradient norm (0: no clipping)."""
    freeze_backbone_steps: NonNegativeInt = 50
    """Stage 2: steps with the encoders and FPNs frozen (only fusion and heads learn)."""
    checkpoint_every: PositiveInt = 50
    """Steps between checkpoints."""
    keep_checkpoints: PositiveInt = 2
    """Newest checkpoints kept per stage."""
    log_every: PositiveInt = 10
    """Steps between progress lines."""
    flips: Bool = True
    """Random flips."""
    rot90: Bool = True
    """Random 90-degree rotations."""
    noise_std: dict[Str, NonNegativeFloat] = field(default_factory=lambda: {"optical": 0.05, "sar": 0.1, "dem": 0.02})
    """Gaussian noise per modality, in normalised units."""
    modality_dropout: dict[Str, DropoutRate] = field(default_factory=dict)
    """Stage 2 only: chance per sample and modality of feeding it as absent (the zero fill,
    presence 0), e.g. ``{optical: 0.15, sar: 0.3, dem: 0.1}``, each in [0, 1); a sample never
    loses every modality. The fused model then supports every subset that leaves out only
    modalities with a rate above 0 (``ModelConfig.modality_subsets``). Empty: no dropout."""
    num_workers: NonNegativeInt = 0
    """DataLoader worker processes."""
    threads: NonNegativeInt = 0
    """torch CPU threads (0: torch's default)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    evaluate: Bool = True
    """Evaluate each stage's final model on the val split (metrics go into record.json)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))
        if not self.modalities:
            raise ValueError("TrainConfig.modalities: needs at least one modality")
        if self.normalization not in ("dataset", "default"):
            raise ValueError(f"TrainConfig.normalization: 'dataset' or 'default', got {self.normalization!r}")
        for name in ("batch_size", "checkpoint_every", "log_every", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name}: must be >= 1, got {getattr(self, name)!r}")
        for name in ("seed", "unimodal_steps", "fusion_steps", "warmup_steps", "freeze_backbone_steps", "num_workers", "threads"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"TrainConfig.{name}: must be >= 0, got {getattr(self, name)!r}")
        if not (self.lr > 0 and self.fusion_lr > 0):
            raise ValueError("TrainConfig.lr and fusion_lr: must be > 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainConfig.device: auto, cpu or cuda, got {self.device!r}")
        unknown = sorted(set(self.modality_dropout) - set(self.modalities))
        if unknown:
            raise ValueError(f"TrainConfig.modality_dropout: {unknown} are not among modalities {list(self.modalities)}")
        if any(not 0.0 <= float(r) < 1.0 for r in self.modality_dropout.values()):
            raise ValueError(f"TrainConfig.modality_dropout: rates must be in [0, 1), got {dict(self.modality_dropout)}")


def load_train_config(path: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """Read a :class:`TrainConfig` from YAML; ``data``, ``out`` and ``unimodal_from`` are taken
    relative to the file.

    Read by the strict reader of :mod:`rtsmap.config_schema` (the field annotations are the
    schema); ``model_overrides`` are checked against ModelConfig here, before any work starts.

    Parameters
    ----------
    path
        The YAML file.
    **overrides
        Fields to replace (command-line flags: an error in one names no file).

    Returns
    -------
    TrainConfig

    Raises
    ------
    rtsmap.errors.ConfigError
        A ``ValueError``, in one line naming the file and the key: the file is missing, not YAML,
        empty or not a mapping, or a key is unknown, missing, of the wrong type or out of range.
    """
    path = Path(path)
    raw = read_yaml(path, "training config")
    raw.update(overrides)
    for key in ("data", "out", "unimodal_from"):  # paths, taken relative to the file
        if isinstance(raw.get(key), str):
            raw[key] = str((path.parent / raw[key]).resolve())
    tc = validate(TrainConfig, raw, str(path), from_elsewhere=set(overrides))
    try:  # the overrides together, on the variant (each stage sets the fields it owns later)
        build_config(tc.model, **tc.model_overrides)
    except ValueError as exc:
        raise ConfigError(f"{path}: model_overrides: {exc}") from None
    return tc


# --- model configs and checkpoints ---------------------------------------------------------------


def stage_model_config(tc: TrainConfig, modalities: tuple[str, ...], fusion: str) -> ModelConfig:
    """The ModelConfig of a stage: bands, tile size and resolution from the chips.

    Parameters
    ----------
    tc
        The training config.
    modalities
        The stage's modalities (one for ``fusion="none"``).
    fusion
        The stage's fusion mode.

    Returns
    -------
    ModelConfig
    """
    manifest = read_manifest(tc.data)
    bands = {m: tuple(manifest["bands"][m]) for m in modalities}
    if tc.normalization == "dataset":
        norm = {m: manifest["normalization"][m] for m in modalities}
    else:
        norm = {m: DEFAULT_NORMALIZATION[m] for m in modalities}
    name = f"{tc.model}-{modalities[0]}" if fusion == "none" else f"{tc.model}-{fusion}"
    # Only the fused stage drops modalities; a model without dropout keeps the empty default.
    subsets = ()
    if fusion != "none" and any(float(tc.modality_dropout.get(m, 0.0)) > 0 for m in modalities):
        subsets = modality_subsets(modalities, tc.modality_dropout)
    overrides = {**tc.model_overrides, "fusion": fusion, "modalities": bands,
                 "normalization": norm, "tile_size": int(manifest["tile_size"]),
                 "resolution": float(manifest["resolution"]), "modality_subsets": subsets}
    return dataclasses.replace(build_config(tc.model, **overrides), name=name)


def save_weights(model: RTSDetector, path: Path, extra: Mapping[str, str] | None = None) -> None:
    """Write the model's state dict as safetensors (temporary name, then rename)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {CONFIG_KEY: json.dumps(model.config.to_dict()), **(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, str]]:
    """Read a safetensors checkpoint: state dict, its ModelConfig and its metadata.

    Parameters
    ----------
    path
        A ``.safetensors`` file written by :func:`save_weights`.

    Returns
    -------
    tuple
        ``(state_dict, config, metadata)``.

    Raises
    ------
    ValueError
        If the file has no rtsmap model config.
    """
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path}: no {CONFIG_KEY!r} metadata; not an rtsmap checkpoint")
    return state, ModelConfig.from_dict(json.loads(meta[CONFIG_KEY])), meta


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A weights file from a ``.safetensors`` path, a sidecar ``.json`` or a stage folder.

    A folder gives its ``model.safetensors`` when training finished, else its newest checkpoint.

    Raises
    ------
    ValueError
        If nothing loadable is found.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return path / "model.safetensors"
        sidecar = latest_checkpoint(path)
        if sidecar is None:
            raise ValueError(f"{path}: no model.safetensors and no checkpoint in this folder")
        path = sidecar
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    return path


def load_detector(path: str | os.PathLike, device: str = "cpu") -> RTSDetector:
    """Rebuild a detector from a checkpoint (see :func:`resolve_checkpoint`), in eval mode.

    Raises
    ------
    ValueError
        If the checkpoint is missing, not an rtsmap checkpoint, or does not fit its config.
    """
    state, config, _ = read_weights(resolve_checkpoint(path))
    model = RTSDetector(config)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def latest_checkpoint(stage_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint's sidecar in a stage folder (None when there is none)."""
    done = []
    for sidecar in Path(stage_dir).glob("step_*.json"):
        if sidecar.with_suffix(".safetensors").is_file() and sidecar.with_suffix(".optim.pt").is_file():
            done.append((int(sidecar.stem.split("_")[1]), sidecar))
    return max(done)[1] if done else None


def _save_checkpoint(stage_dir: Path, model: RTSDetector, optimizer: torch.optim.Optimizer, info: dict, keep: int) -> Path:
    step = info["step"]
    base = stage_dir / f"step_{step:06d}"
    save_weights(model, base.with_suffix(".safetensors"), {"step": str(step)})
    tmp = base.with_suffix(".optim.pt.tmp")
    torch.save(optimizer.state_dict(), tmp)
    os.replace(tmp, base.with_suffix(".optim.pt"))
    sidecar = base.with_suffix(".json")
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, sidecar)  # last: the checkpoint exists from here on
    old = sorted(stage_dir.glob("step_*.json"))[:-keep]
    for s in old:
        for suffix in (".json", ".safetensors", ".optim.pt"):
            s.with_suffix(suffix).unlink(missing_ok=True)
    return sidecar


# --- optimisation ---------------------------------------------------------------------------------


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Learning rate of ``step``: linear warmup from 1% of ``peak``, then cosine to ``min_ratio * peak``."""
    if warmup > 0 and step < warmup:
        return peak * (0.01 + 0.99 * step / warmup)
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, weight_decay: float, gate_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and kernels only (not norms, biases, gates, embeddings).

    Fusion gates (and the zero-initialised fill of ``query_fill``) get their own group whose
    ``lr_scale`` multiplies the scheduled rate.
    """
    decay, no_decay, gates = [], [], []
    for name, p in model.named_parameters():
        if name.endswith(".gate") or ".gate_from_query." in name or ".fill_from_aux." in name:
            gates.append(p)
        elif p.ndim >= 2 and "embed" not in name and "rel_pos" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0, "lr_scale": gate_lr_scale})
    return torch.optim.AdamW(groups, lr=1e-4)


def set_backbone_frozen(model: RTSDetector, frozen: bool) -> None:
    """Freeze or unfreeze the encoders and FPNs (fusion layers and heads keep learning)."""
    for name in ("encoders", "fpns"):
        for p in getattr(model.backbone, name).parameters():
            p.requires_grad_(not frozen)


class StepBatches:
    """Batches of ``(index, seed)`` keys for steps ``start..total-1``; batch s depends only on (seed, s).

    Each epoch is a seeded permutation of the chips; the per-step seed drives the augmentations.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, total: int) -> None:
        if n == 0:
            raise ValueError("the training split has no chips")
        self.n, self.batch_size, self.seed, self.start, self.total = n, min(batch_size, n), seed, start, total
        self.per_epoch = self.n // self.batch_size

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.total):
            epoch, j = divmod(step, self.per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            step_seed = int(np.random.SeedSequence([self.seed, step]).generate_state(1)[0])
            yield [(int(i), step_seed) for i in order[j * self.batch_size:(j + 1) * self.batch_size]]


def _device(tc: TrainConfig) -> torch.device:
    if tc.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(tc.device)


def _to(target: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in target.items()}


def _progress_printer(name: str, total: int) -> Callable[[str], None]:
    def emit(text: str) -> None:
        print(f"[{name}] {text}", file=sys.stderr, flush=True)

    return emit


def train_stage(
    tc: TrainConfig,
    stage: str,
    model: RTSDetector,
    *,
    steps: int,
    lr: float,
    freeze_steps: int = 0,
    resume: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train one model for ``steps`` optimizer steps, checkpointing and resuming in ``out/<stage>``.

    Parameters
    ----------
    tc
        The training config.
    stage
        Stage folder name (``unimodal_optical``, ``fusion``...).
    model
        The detector at step 0 (replaced by the checkpoint's weights when resuming).
    steps
        Total optimizer steps.
    lr
        Peak learning rate.
    freeze_steps
        Steps with the backbone frozen.
    resume
        Continue from the newest checkpoint; False deletes the stage's checkpoints first.
    progress
        Receives one line per ``log_every`` steps (default: stderr).

    Returns
    -------
    dict
        The stage's record (also written to ``record.json``).
    """
    stage_dir = _stage_dir(tc, stage, resume)
    emit = progress or _progress_printer(stage, steps)
    device = _device(tc)
    model.to(device)
    optimizer = make_optimizer(model, tc.weight_decay, tc.gate_lr_scale)
    start, seconds = _resume_from_checkpoint(stage_dir, model, optimizer, device, steps, emit) if resume else (0, 0.0)

    dataset = ChipDataset(tc.data, "train", model.config.modalities, model.config.normalization,
                          augment=Augment(tc.flips, tc.rot90, dict(tc.noise_std)), seed=tc.seed)
    loader = DataLoader(dataset, batch_sampler=StepBatches(len(dataset), tc.batch_size, tc.seed, start, steps),
                        collate_fn=collate, num_workers=tc.num_workers)
    # Modality dropout only where the model can take presence (a fused model that records the
    # subsets it is trained for; stage_model_config sets them from tc.modality_dropout).
    rates = ([float(tc.modality_dropout.get(m, 0.0)) for m in model.config.modalities]
             if model.config.modality_subsets else None)
    model.train()
    step = start
    window: list[float] = []
    tick = time.perf_counter()
    for inputs, targets in loader:
        if freeze_steps:
            set_backbone_frozen(model, step < freeze_steps)
        lr_now = lr_at(step, steps, lr, tc.warmup_steps, tc.min_lr_ratio)
        loss, losses = _train_step(tc, stage, model, optimizer, inputs, targets,
                                   step=step, lr_now=lr_now, rates=rates, device=device)
        step += 1
        now = time.perf_counter()
        seconds += now - tick
        window.append(now - tick)
        tick = now
        if step % tc.log_every == 0 or step == steps:
            parts = " ".join(f"{k.removeprefix('loss_')}={v.item():.3f}" for k, v in losses.items())
            emit(f"step {step}/{steps} loss={loss.item():.3f} lr={lr_now:.2e} {np.mean(window):.2f} s/step | {parts}")
            window.clear()
        if step % tc.checkpoint_every == 0 or step == steps:
            _save_checkpoint(stage_dir, model, optimizer, {
                "step": step, "total_steps": steps, "train_seconds": seconds, "stage": stage,
                "model_config": model.config.to_dict(), "train_config": dataclasses.asdict(tc),
            }, tc.keep_checkpoints)
            tick = time.perf_counter()  # checkpoint time is not step time

    save_weights(model, stage_dir / "model.safetensors", {"step": str(step), "stage": stage})
    record: dict[str, Any] = {
        "stage": stage,
        "steps": step,
        "resumed_from": start,
        "seed": tc.seed,
        "train_seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(step, 1), 3),
        "device": str(device),
        "train_chips": len(dataset),
        "train_config": dataclasses.asdict(tc),
        "model_config": model.config.to_dict(),
        "weights": str(stage_dir / "model.safetensors"),
    }
    if tc.evaluate:
        record["metrics"] = _stage_metrics(tc, model, device)
    (stage_dir / "record.json").write_text(json.dumps(record, indent=1))
    return record


def _stage_dir(tc: TrainConfig, stage: str, resume: bool) -> Path:
    """Create ``out/<stage>``, emptied of checkpoints, weights and record unless resuming."""
    stage_dir = Path(tc.out) / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        for f in list(stage_dir.glob("step_*")) + [stage_dir / "model.safetensors", stage_dir / "record.json"]:
            f.unlink(missing_ok=True)
    return stage_dir


def _resume_from_checkpoint(stage_dir: Path, model: RTSDetector, optimizer: torch.optim.Optimizer,
                            device: torch.device, steps: int, emit: Callable[[str], None]) -> tuple[int, float]:
    """Load the newest checkpoint into model and optimizer; return (step, train seconds), (0, 0.0) if none."""
    sidecar = latest_checkpoint(stage_dir)
    if sidecar is None:
        return 0, 0.0
    info = json.loads(sidecar.read_text())
    state, config, _ = read_weights(sidecar.with_suffix(".safetensors"))
    if config != model.config:
        raise ValueError(f"{sidecar}: the checkpoint's model config differs from this run's; "
                         "use --no-resume to start the stage over")
    model.load_state_dict(state, strict=True)
    optimizer.load_state_dict(torch.load(sidecar.with_suffix(".optim.pt"), map_location=device, weights_only=True))
    start, seconds = int(info["step"]), float(info["train_seconds"])
    emit(f"resuming from {sidecar.name} (step {start}/{steps})")
    return start, seconds


def _train_step(tc: TrainConfig, stage: str, model: RTSDetector, optimizer: torch.optim.Optimizer,
                inputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]], *, step: int,
                lr_now: float, rates: list[float] | None, device: torch.device,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run one optimizer step at ``lr_now``; return the total loss and its parts."""
    # Proposal sampling draws from torch's global RNG: seeding it per step makes a resumed
    # run take the very steps an uninterrupted one takes.
    torch.manual_seed(tc.seed * 1_000_003 + step)
    for group in optimizer.param_groups:
        group["lr"] = lr_now * group.get("lr_scale", 1.0)
    presence = None
    if rates is not None:
        # Seeded by (seed, step) like the batches, so a resumed run drops the same modalities.
        present = draw_presence(np.random.default_rng([tc.seed, step, 0xD20F]), len(targets), rates)
        inputs, presence = apply_presence(inputs, present, list(model.config.modalities))
        presence = presence.to(device)
    losses = model({m: x.to(device) for m, x in inputs.items()}, [_to(t, device) for t in targets],
                   presence=presence)
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{stage} step {step}: loss is {loss.item()} ({ {k: float(v) for k, v in losses.items()} })")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], tc.grad_clip)
    optimizer.step()
    return loss, losses


def _stage_metrics(tc: TrainConfig, model: RTSDetector, device: torch.device) -> dict[str, Any]:
    """Validation metrics for the record, also with each one modality absent where trained for it."""
    from rtsmap.models.evaluate import evaluate_detector

    try:
        metrics = {"val": evaluate_detector(model, tc.data, "val", device=str(device))}
        # A model trained with modality dropout: how it maps with each one modality absent.
        for subset in model.config.modality_subsets:
            if len(subset) == len(model.config.modalities) - 1:
                metrics["val_" + "+".join(subset)] = evaluate_detector(
                    model, tc.data, "val", device=str(device), present=subset)
    except ValueError as exc:  # e.g. an empty val split
        metrics = {"val": None, "note": str(exc)}
    return metrics


def build_fused_model(config: ModelConfig, unimodal: Mapping[str, str | os.PathLike], heads_from: str = "optical") -> RTSDetector:
    """A fused detector from unimodal checkpoints: branches per modality, heads from ``heads_from``.

    Parameters
    ----------
    config
        The fused model's config (any ``fusion`` but ``none``).
    unimodal
        Modality -> checkpoint (file or stage folder) of its ``fusion="none"`` model; data-level
        fusion reads only ``heads_from``'s.
    heads_from
        Modality whose RPN and cascade/mask heads are copied (the fusion query, optical).

    Returns
    -------
    RTSDetector

    Raises
    ------
    ValueError
        If a modality's checkpoint is missing or does not fill its branch whole.
    """
    model = RTSDetector(config)
    # Data-level fusion has one stacked branch: it starts from the query modality's model (its
    # stem widened with zero weights for the other bands); the other checkpoints are not used.
    sources = (heads_from,) if config.fusion == "data_level" else config.modalities
    for m in sources:
        if m not in unimodal:
            raise ValueError(f"no unimodal checkpoint for {m!r}; train stage 'unimodal' first")
        state, _, _ = read_weights(resolve_checkpoint(unimodal[m]))
        result = model.backbone.load_unimodal_state(m, state, prefix="backbone.")
        if result.missing_keys:
            raise ValueError(f"{unimodal[m]}: does not fill the {m!r} branch (missing {result.missing_keys[:3]}...)")
        if m == heads_from:
            heads = {k: v for k, v in state.items() if k.startswith(("rpn.", "roi_heads."))}
            missing, unexpected = model.load_state_dict(heads, strict=False)
            wanted = [k for k in model.state_dict() if k.startswith(("rpn.", "roi_heads."))]
            if set(wanted) - set(heads) or unexpected:
                raise ValueError(f"{unimodal[m]}: heads do not match the fused model's")
    return model


def train(tc: TrainConfig, stage: str = "all", resume: bool = True,
          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run stage 1 (one model per modality), stage 2 (fusion), or both; a finished stage is skipped.

    Parameters
    ----------
    tc
        The training config.
    stage
        ``unimodal``, ``fusion`` or ``all``.
    resume
        Continue from checkpoints (and skip finished stages); False starts the named stages over.
    progress
        Line sink for progress (default: stderr).

    Returns
    -------
    dict
        Stage name -> record; also written to ``out/run.json``.
    """
    if stage not in STAGES:
        raise ValueError(f"stage: {stage!r}, expected one of {STAGES}")
    torch.manual_seed(tc.seed)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    records: dict[str, Any] = {}

    def finished(name: str) -> dict | None:
        path = out / name / "record.json"
        if resume and path.is_file() and (out / name / "model.safetensors").is_file():
            return json.loads(path.read_text())
        return None

    pretrained = Path(tc.unimodal_from) if tc.unimodal_from else out
    if stage in ("unimodal", "all") and tc.unimodal_from is None:
        for m in tc.modalities:
            name = f"unimodal_{m}"
            records[name] = finished(name)
            if records[name] is None:
                torch.manual_seed(tc.seed)
                model = RTSDetector(stage_model_config(tc, (m,), "none"))
                records[name] = train_stage(tc, name, model, steps=tc.unimodal_steps, lr=tc.lr,
                                            resume=resume, progress=progress)
    if stage in ("fusion", "all") and len(tc.modalities) > 1:
        records["fusion"] = finished("fusion")
        if records["fusion"] is None:
            torch.manual_seed(tc.seed)
            config = stage_model_config(tc, tc.modalities, tc.fusion)
            model = build_fused_model(config, {m: pretrained / f"unimodal_{m}" for m in tc.modalities}, tc.modalities[0])
            records["fusion"] = train_stage(tc, "fusion", model, steps=tc.fusion_steps, lr=tc.fusion_lr,
                                            freeze_steps=tc.freeze_backbone_steps, resume=resume, progress=progress)
    run = {"stage": stage, "seed": tc.seed, "wall_seconds": round(time.time() - started, 2),
           "train_config": dataclasses.asdict(tc), "stages": records}
    (out / "run.json").write_text(json.dumps(run, indent=1))
    return run
