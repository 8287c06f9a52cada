"""Modality dropout in fine-tuning: the draw, the fill, the configuration, and the subsets a
model trained with it declares (fast: no chips are trained on here; tests/test_training.py runs
a fused stage with dropout on real chips)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from rtsmap import contract
from rtsmap.errors import ConfigError
from rtsmap.models.config import DEFAULT_MODALITIES, DEFAULT_NORMALIZATION, build_config
from rtsmap.models.data import apply_presence, draw_presence
from rtsmap.models.train import load_train_config, stage_model_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "workflows" / "train_configs"
MODS = ("optical", "sar", "dem")


@settings(max_examples=200, deadline=None)
@given(
    rates=st.lists(st.floats(0.0, 0.999, allow_nan=False), min_size=1, max_size=4),
    batch=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
)
def test_dropout_never_drops_every_modality_of_a_sample(rates, batch, seed):
    present = draw_presence(np.random.default_rng(seed), batch, rates)
    assert present.shape == (batch, len(rates)) and present.dtype == bool
    assert present.any(axis=1).all()
    for i, rate in enumerate(rates):
        if rate == 0.0:
            assert present[:, i].all()  # a rate of 0 never drops


def test_dropout_rates_hold_statistically():
    rates = np.array([0.15, 0.3, 0.1])
    n = 200_000
    present = draw_presence(np.random.default_rng(0), n, rates)
    # Redrawing the samples that lost everything conditions on "not all dropped".
    all_dropped = rates.prod()
    expected = (rates - all_dropped) / (1 - all_dropped)
    dropped = 1 - present.mean(axis=0)
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert (np.abs(dropped - expected) < 5 * sigma).all(), (dropped, expected)
    # Independent between modalities: both optical and SAR dropped as often as the product says.
    both = (~present[:, 0] & ~present[:, 1]).mean()
    want = (rates[0] * rates[1] - all_dropped) / (1 - all_dropped)
    assert abs(both - want) < 5 * np.sqrt(want * (1 - want) / n)
    # The same generator state draws the same flags (a resumed run drops the same modalities).
    again = draw_presence(np.random.default_rng(0), n, rates)
    assert np.array_equal(present, again)


@pytest.mark.parametrize("rates", [[1.0, 0.2], [-0.1], [], [[0.1]]])
def test_dropout_refuses_rates_outside_0_1(rates):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        draw_presence(np.random.default_rng(0), 4, rates)


def test_dropped_modality_is_the_zero_fill_with_presence_0():
    inputs = {m: torch.randn(3, c, 8, 8) for m, c in {"optical": 4, "sar": 2, "dem": 3}.items()}
    before = {m: x.clone() for m, x in inputs.items()}
    present = np.array([[True, False, True], [False, True, True], [True, True, True]])
    out, presence = apply_presence(inputs, present, MODS)
    assert presence.dtype == torch.float32 and presence.tolist() == present.astype(float).tolist()
    assert (out["sar"][0] == 0).all() and (out["optical"][1] == 0).all()
    assert torch.equal(out["sar"][1:], before["sar"][1:]) and torch.equal(out["dem"], before["dem"])
    # The fill is what normalisation gives a modality whose pixels are all invalid.
    norm = DEFAULT_NORMALIZATION["sar"]
    fill = contract.normalize(np.ones((2, 8, 8)), np.zeros((8, 8), bool), norm["mean"], norm["std"])
    assert torch.equal(out["sar"][0], torch.from_numpy(fill))
    for m in MODS:  # the batch given is not changed
        assert torch.equal(inputs[m], before[m])


# --- configuration ------------------------------------------------------------------------------


def _write(tmp_path: Path, **keys) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"data": "chips", "out": "out", **keys}))
    return path


@pytest.mark.parametrize(
    "dropout, message",
    [
        ({"sar": 1.0}, r"modality_dropout.sar: must be in \[0, 1\)"),
        ({"sar": -0.1}, r"modality_dropout.sar: must be in \[0, 1\)"),
        ({"sar": "often"}, "modality_dropout.sar: expected a number"),
        ({"sar": True}, "modality_dropout.sar: expected a number"),
        ({"lidar": 0.1}, r"modality_dropout: \['lidar'\] are not among modalities"),
        ([0.1, 0.2], "modality_dropout: expected a mapping"),
    ],
)
def test_dropout_config_is_checked_by_the_strict_reader(tmp_path, dropout, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_train_config(_write(tmp_path, modality_dropout=dropout))
    assert "\n" not in str(info.value) and "train.yaml" in str(info.value)


def test_dropout_config_reads_numbers_and_yaml_1_1_strings(tmp_path):
    tc = load_train_config(_write(tmp_path, modality_dropout={"optical": 0.15, "sar": "3e-1", "dem": 0}))
    assert tc.modality_dropout == {"optical": 0.15, "sar": 0.3, "dem": 0.0}
    assert load_train_config(_write(tmp_path)).modality_dropout == {}


def test_demo_dropout_config_is_the_demo_config_plus_dropout():
    demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    dropout = yaml.safe_load((CONFIGS / "demo_dropout.yaml").read_text())
    rates = dropout.pop("modality_dropout")
    assert set(rates) == set(MODS) and all(0 < r < 1 for r in rates.values())
    assert dropout.pop("out") != demo.pop("out")  # its own output folder
    assert dropout.pop("unimodal_from") == "../../runs/demo-train/training"  # demo.yaml's unimodal stage
    assert dropout == demo
    tc = load_train_config(CONFIGS / "demo_dropout.yaml")
    assert tc.modality_dropout == rates


def _chips_manifest(tmp_path: Path) -> Path:
    """A dataset.json as `rtsmap training-data` writes it (stage_model_config reads only this)."""
    root = tmp_path / "chips"
    root.mkdir()
    manifest = {"format": "rtsmap-chips/1", "tile_size": 64, "resolution": 10.0,
                "bands": {m: list(b) for m, b in DEFAULT_MODALITIES.items()},
                "normalization": {m: {k: list(v) for k, v in s.items()} for m, s in DEFAULT_NORMALIZATION.items()}}
    (root / "dataset.json").write_text(json.dumps(manifest))
    return root


def test_fused_stage_records_the_subsets_its_dropout_trains(tmp_path):
    chips = _chips_manifest(tmp_path)
    tc = load_train_config(_write(tmp_path, data=str(chips), modality_dropout={"optical": 0.15, "sar": 0.3, "dem": 0.1}))
    fused = stage_model_config(tc, MODS, "residual_attention")
    assert fused.modality_subsets == contract.modality_subsets(MODS, tc.modality_dropout)
    assert len(fused.modality_subsets) == 7 and fused.supported_subsets[0] == MODS
    # Pretraining sees one modality: no dropout, no subsets.
    assert stage_model_config(tc, ("sar",), "none").modality_subsets == ()
    # SAR only: the model can lack SAR and nothing else.
    sar_only = load_train_config(_write(tmp_path, data=str(chips), modality_dropout={"sar": 0.3}))
    assert stage_model_config(sar_only, MODS, "residual_attention").modality_subsets == (MODS, ("optical", "dem"))
    plain = load_train_config(_write(tmp_path, data=str(chips)))
    config = stage_model_config(plain, MODS, "residual_attention")
    assert config.modality_subsets == () and config.supported_subsets == (MODS,)
    with pytest.raises(ConfigError, match="modality_subsets: is set by each stage"):
        load_train_config(_write(tmp_path, data=str(chips), model_overrides={"modality_subsets": [list(MODS)]}))


@pytest.mark.parametrize(
    "subsets, message",
    [
        ([["optical", "dem"]], "must start with the full set"),
        ([list(MODS), ["optical", "lidar"]], "lidar"),
        ([list(MODS), ["dem", "optical"]], "model order"),
        ([list(MODS), []], "non-empty"),
        ([list(MODS), ["sar"], ["sar"]], "twice"),
    ],
)
def test_model_config_checks_its_subsets(subsets, message):
    with pytest.raises(ValueError, match=message):
        build_config("demo", modality_subsets=subsets)
