"""Training chips as a torch Dataset: normalised modality tensors and instance targets.

Reads what ``workflows/training_data.py`` writes (``dataset.json``, ``annotations.json`` in
COCO form, ``chips/*.npz``); this module never imports the pipeline, the files are the
interface. Inputs are normalised by the function the pipeline normalises them with for the
exported model (``rtsmap.contract.normalize``): ``(x - mean) / std`` per band, then invalid
pixels set to 0.

Augmentations respect geography: the geometric ones are the eight symmetries of the square
(flips and 90-degree rotations), applied to all modalities, valid masks and instance masks at
once, so the modalities stay co-registered and the ground sampling distance (hence the size of a
slump in pixels, which carries meaning at a fixed 10 m) never changes: no rescaling, no
sub-pixel warps. Radiometric noise is added per modality in normalised units and only on
valid pixels (invalid ones stay exactly 0, as at inference).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor
from torch.utils.data import Dataset

from rtsmap.contract import normalize

#: Format tag of dataset.json written by workflows/training_data.py.
DATASET_FORMAT = "rtsmap-chips/1"


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read ``dataset.json`` of a chip folder.

    Parameters
    ----------
    root
        The chip folder.

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        If the folder has no readable manifest of the expected format.
    """
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise ValueError(f"{root}: no dataset.json; make the chips with `rtsmap training-data`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != DATASET_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {DATASET_FORMAT!r}")
    return manifest


@dataclass(frozen=True)
class Augment:
    """Random augmentations of a training chip."""

    flips: bool = True
    """Random horizontal and vertical flips."""
    rot90: bool = True
    """Random rotations by a multiple of 90 degrees."""
    noise_std: Mapping[str, float] = field(default_factory=dict)
    """Gaussian noise std per modality, in normalised units (e.g. ``{"sar": 0.1}``)."""


class ChipDataset(Dataset):
    """Chips of one split, with targets for ``RTSDetector``.

    Parameters
    ----------
    root
        Chip folder (``dataset.json``, ``annotations.json``, ``chips/``).
    split
        ``train``, ``val``, ``test`` or ``all``.
    modalities
        Ordered modality -> band names the model takes (a subset of the chips' modalities;
        the band order must match the chips').
    normalization
        Per modality ``{"mean": [...], "std": [...]}``.
    augment
        Augmentations, or None (evaluation).
    seed
        Seed of the augmentations when an item is asked for by plain index.

    Raises
    ------
    ValueError
        If the chips lack a modality or band, or the split is empty of images and unknown.

    Notes
    -----
    ``dataset[i]`` or ``dataset[(i, seed)]``: the second form fixes the augmentation's random
    draw, so a resumed training run sees the very batches it would have seen.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        modalities: Mapping[str, Sequence[str]],
        normalization: Mapping[str, Mapping[str, Sequence[float]]],
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        coco = json.loads((self.root / "annotations.json").read_text())
        if split not in ("train", "val", "test", "all"):
            raise ValueError(f"split: {split!r}, expected train, val, test or all")
        self.split = split
        self.images = [i for i in coco["images"] if split == "all" or i.get("split") == split]
        image_ids = {i["id"] for i in self.images}
        self.annotations: dict[int, list[dict]] = {i: [] for i in image_ids}
        for a in coco["annotations"]:
            if a["image_id"] in image_ids:
                self.annotations[a["image_id"]].append(a)
        self.coco = {
            "images": self.images,
            "annotations": [a for i in self.images for a in self.annotations[i["id"]]],
            "categories": coco["categories"],
        }
        self.modalities = {m: tuple(b) for m, b in modalities.items()}
        self.tile_size = int(self.manifest["tile_size"])
        self.index: dict[str, np.ndarray] = {}
        for m, bands in self.modalities.items():
            have = self.manifest["bands"].get(m)
            if have is None:
                raise ValueError(f"{self.root}: the chips have no {m!r} modality (they have {list(self.manifest['bands'])})")
            missing = [b for b in bands if b not in have]
            if missing:
                raise ValueError(f"{self.root}: {m!r} chips lack band(s) {missing} (they have {have})")
            self.index[m] = np.asarray([have.index(b) for b in bands])
        self.mean = {m: np.asarray(normalization[m]["mean"], np.float32)[:, None, None] for m in self.modalities}
        self.std = {m: np.asarray(normalization[m]["std"], np.float32)[:, None, None] for m in self.modalities}
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = self.images[index]
        inputs = self.load_inputs(index)
        anns = self.annotations[image["id"]]
        t = self.tile_size
        if anns:
            rles = [{"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode("ascii")} for a in anns]
            masks = mask_utils.decode(rles).transpose(2, 0, 1)  # [N, T, T]
        else:
            masks = np.zeros((0, t, t), np.uint8)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, index] if seed is None else [seed, index])
            inputs, masks = _augment(inputs, masks, self.augment, rng)
        target = {
            "boxes": torch.from_numpy(masks_to_boxes(masks)),
            "labels": torch.ones(len(masks), dtype=torch.int64),
            "masks": torch.from_numpy(np.ascontiguousarray(masks)),
            "image_id": torch.tensor(image["id"]),
        }
        return {m: torch.from_numpy(np.ascontiguousarray(x)) for m, x in inputs.items()}, target

    def load_inputs(self, index: int) -> dict[str, np.ndarray]:
        """Normalised ``[C, T, T]`` float32 arrays per modality of chip ``index`` (invalid pixels 0)."""
        out = {}
        with np.load(self.root / self.images[index]["file_name"]) as z:
            for m in self.modalities:
                x = z[m][self.index[m]].astype(np.float32)
                valid = z[f"{m}_valid"]
                out[m] = normalize(x, valid, self.mean[m].ravel(), self.std[m].ravel())
        return out


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """``[N, 4]`` float32 x1, y1, x2, y2 boxes enclosing ``[N, T, T]`` masks (pixel edges, as COCO)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for k, m in enumerate(masks):
        rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        if len(rows):
            boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def _augment(
    inputs: dict[str, np.ndarray], masks: np.ndarray, augment: Augment, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One random square symmetry for all arrays, then per-modality noise on valid pixels."""
    k = int(rng.integers(4)) if augment.rot90 else 0
    flip_h = bool(rng.integers(2)) if augment.flips else False
    flip_v = bool(rng.integers(2)) if augment.flips else False

    def geo(a: np.ndarray) -> np.ndarray:
        a = np.rot90(a, k, axes=(-2, -1))
        if flip_h:
            a = a[..., :, ::-1]
        if flip_v:
            a = a[..., ::-1, :]
        return a

    out = {}
    for m, x in inputs.items():
        x = geo(x)
        std = float(augment.noise_std.get(m, 0.0))
        if std > 0:
            # Invalid pixels are exactly 0 after normalisation; they stay 0.
            x = np.where(x != 0, x + rng.normal(0.0, std, x.shape).astype(np.float32), 0.0)
        out[m] = np.ascontiguousarray(x, dtype=np.float32)
    return out, np.ascontiguousarray(geo(masks))


def draw_presence(rng: np.random.Generator, batch: int, rates: Sequence[float]) -> np.ndarray:
    """Modality dropout: which modalities each sample keeps, never none.

    Each modality of each sample is dropped with its rate, independently; a sample that would
    lose every modality is drawn again (so the rates hold conditionally on keeping at least one,
    which moves them by at most the chance of dropping all, e.g. 0.5% at 0.15/0.3/0.1).

    Parameters
    ----------
    rng : numpy.random.Generator
        The draw's generator (seeded per step, so a resumed run drops the same modalities).
    batch : int
        Samples.
    rates : sequence of float
        Dropout rate per modality, in model order, each in [0, 1).

    Returns
    -------
    ndarray of bool
        ``[batch, len(rates)]``, True where the modality is kept (present).

    Raises
    ------
    ValueError
        When a rate is outside [0, 1) or there are no modalities.
    """
    rates = np.asarray(rates, np.float64)
    if rates.ndim != 1 or len(rates) == 0 or not ((rates >= 0) & (rates < 1)).all():
        raise ValueError(f"modality dropout rates must be in [0, 1), one per modality, got {rates.tolist()}")
    present = rng.random((batch, len(rates))) >= rates
    while True:
        empty = ~present.any(axis=1)
        if not empty.any():
            return present
        present[empty] = rng.random((int(empty.sum()), len(rates))) >= rates


def apply_presence(inputs: Mapping[str, Tensor], present: np.ndarray, modalities: Sequence[str]) -> tuple[dict[str, Tensor], Tensor]:
    """Feed dropped modalities as the documented fill, and the presence flags the model takes.

    The fill is what :func:`rtsmap.contract.normalize` gives a modality whose pixels are all
    invalid: zeros, the same numbers the pipeline feeds for a modality it has no scene of.

    Parameters
    ----------
    inputs : mapping of str to Tensor
        ``{modality: [B, C, T, T]}`` normalised batch.
    present : ndarray of bool
        ``[B, M]`` from :func:`draw_presence`, M in ``modalities`` order.
    modalities : sequence of str
        The model's modalities, in order.

    Returns
    -------
    inputs : dict of str to Tensor
        The batch with dropped samples' modalities zeroed (new tensors; the given ones are kept).
    presence : Tensor
        float32 ``[B, M]``, 1 where present.
    """
    presence = torch.from_numpy(np.asarray(present, np.float32))
    out = {}
    for i, m in enumerate(modalities):
        keep_rows = presence[:, i].to(inputs[m].dtype)[:, None, None, None]
        out[m] = inputs[m] * keep_rows
    return out, presence


def collate(batch: list[tuple[dict[str, Tensor], dict[str, Tensor]]]) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """Stack the inputs of a batch per modality; keep targets as a list (instance counts differ).

    Parameters
    ----------
    batch
        Items of :class:`ChipDataset`.

    Returns
    -------
    tuple
        ``{modality: [B, C, T, T]}`` and the list of B target dicts.
    """
    modalities = list(batch[0][0])
    inputs = {m: torch.stack([b[0][m] for b in batch]) for m in modalities}
    return inputs, [b[1] for b in batch]
