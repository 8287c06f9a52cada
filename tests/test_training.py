"""Training chips through the real pipeline, two-stage training with resume, evaluation, ONNX.

Everything is real: chips are cut from the demo region's COGs by pipeline.load, the detector
trains a few steps on CPU, checkpoints are real safetensors files, the ONNX model runs in
onnxruntime. Tiles are 64 px (the smallest the model takes) to keep the test fast.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import shapely
import torch
import yaml
from click.testing import CliRunner

from rtsmap.workflows.training_data import ChipOptions, chips_from_region

torch.set_num_threads(1)

TILE = 64


@pytest.fixture(scope="module")
def chips(demo_region, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chips")
    chips_from_region(demo_region.root, out, options=ChipOptions(tile_px=TILE, block_tiles=1, cluster_buffer_m=50.0))
    return out


def _coco(chips: Path) -> dict:
    return json.loads((chips / "annotations.json").read_text())


def test_chips_have_model_shapes_and_physical_values(chips):
    manifest = json.loads((chips / "dataset.json").read_text())
    assert manifest["bands"] == {"optical": ["blue", "green", "red", "nir"], "sar": ["vv", "vh"],
                                 "dem": ["slope", "hillshade", "relative_elevation"]}
    coco = _coco(chips)
    assert len(coco["images"]) >= 40 and coco["annotations"]
    with np.load(chips / coco["images"][0]["file_name"]) as z:
        for m, c in (("optical", 4), ("sar", 2), ("dem", 3)):
            assert z[m].shape == (c, TILE, TILE) and z[m].dtype == np.float32
            assert z[f"{m}_valid"].shape == (TILE, TILE) and z[f"{m}_valid"].dtype == bool
        valid = z["optical_valid"]
        assert valid.any()
        # Raw physical values: reflectance 0..1, gamma0 in dB.
        assert 0 <= z["optical"][:, valid].min() and z["optical"][:, valid].max() <= 1.5
        assert z["sar"][:, z["sar_valid"]].max() < 5
    for name in ("optical", "sar", "dem"):
        assert all(s > 0 for s in manifest["normalization"][name]["std"])


def test_masks_match_truth_polygons(chips, demo_region):
    from pycocotools import mask as mask_utils

    coco = _coco(chips)
    images = {i["id"]: i for i in coco["images"]}
    checked = 0
    for a in coco["annotations"]:
        image = images[a["image_id"]]
        truth = pyogrio.read_dataframe(demo_region.truth, layer=f"rts_{image['year']}").to_crs(image["crs"])
        poly = truth.geometry[truth["slump_id"] == a["truth_id"]].iloc[0]
        inside = poly.intersection(shapely.box(*image["bounds"]))
        expected_px = inside.area / 100.0
        rle = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
        got_px = float(mask_utils.area(rle))
        # Pixel-centre rasterization: the error grows with the outline, a few pixels at most here.
        assert abs(got_px - expected_px) <= max(4.0, 0.08 * expected_px), (a["truth_id"], got_px, expected_px)
        assert got_px == a["area"]
        x, y, w, h = a["bbox"]
        minx, _, _, maxy = image["bounds"]
        bx0, by0, bx1, by1 = inside.bounds
        assert abs(x - (bx0 - minx) / 10) <= 1.5 and abs(y - (maxy - by1) / 10) <= 1.5
        checked += 1
    assert checked >= 10


def test_splits_are_spatially_leak_free(chips):
    coco = _coco(chips)
    split_of = {i["id"]: i["split"] for i in coco["images"]}
    counts = {s: sum(v == s for v in split_of.values()) for s in ("train", "val", "test")}
    assert counts["train"] > 0 and counts["val"] + counts["test"] > 0
    slumps: dict[str, set] = {}
    tiles: dict[str, set] = {}
    for a in coco["annotations"]:
        slumps.setdefault(a["truth_id"], set()).add(split_of[a["image_id"]])
    for i in coco["images"]:
        tiles.setdefault(i["tile_id"], set()).add(i["split"])
    # Some slumps are cut by tile edges (so grouping matters); none crosses a split.
    assert any(len({images_tile for images_tile in _tiles_of(coco, sid)}) > 1 for sid in slumps)
    assert all(len(s) == 1 for s in slumps.values()), slumps
    assert all(len(s) == 1 for s in tiles.values())  # every year of a tile in one split
    # No pixel of one split lies in a chip of another (chips do not overlap).
    boxes = {s: shapely.union_all([shapely.box(*i["bounds"]) for i in coco["images"] if i["split"] == s]) for s in counts}
    for a_, b_ in (("train", "val"), ("train", "test"), ("val", "test")):
        assert boxes[a_].intersection(boxes[b_]).area == 0


def _tiles_of(coco: dict, truth_id: str) -> set:
    images = {i["id"]: i["tile_id"] for i in coco["images"]}
    return {images[a["image_id"]] for a in coco["annotations"] if a["truth_id"] == truth_id}


def test_dataset_normalises_augments_and_collates(chips):
    from rtsmap.models.data import Augment, ChipDataset, collate

    norm = json.loads((chips / "dataset.json").read_text())["normalization"]
    mods = {"optical": ("blue", "green", "red", "nir"), "dem": ("slope", "hillshade", "relative_elevation")}
    plain = ChipDataset(chips, "all", mods, norm)
    index = next(k for k, i in enumerate(plain.images) if i["instances"])
    inputs, target = plain[index]
    with np.load(chips / plain.images[index]["file_name"]) as z:
        raw, valid = z["optical"], z["optical_valid"]
    mean = np.asarray(norm["optical"]["mean"])[:, None, None]
    std = np.asarray(norm["optical"]["std"])[:, None, None]
    expected = np.where(valid[None], (raw - mean) / std, 0.0)
    np.testing.assert_allclose(inputs["optical"].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert target["masks"].shape[1:] == (TILE, TILE) and len(target["boxes"]) == len(target["masks"])
    assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()

    aug = ChipDataset(chips, "all", mods, norm, augment=Augment(noise_std={"dem": 0.1}))
    a1, t1 = aug[(index, 7)]
    a2, t2 = aug[(index, 7)]
    assert torch.equal(a1["dem"], a2["dem"])  # same key, same draw (resumable)
    # The symmetry moves masks and every modality together: mask pixels keep their values.
    assert t1["masks"].sum() == target["masks"].sum()
    assert (a1["optical"] == 0).sum() == (inputs["optical"] == 0).sum()
    batch_inputs, batch_targets = collate([plain[0], plain[index]])
    assert batch_inputs["optical"].shape == (2, 4, TILE, TILE) and len(batch_targets) == 2


@pytest.fixture(scope="module")
def trained(chips, tmp_path_factory):
    from rtsmap.models.train import load_train_config, train

    root = tmp_path_factory.mktemp("train")
    cfg = {"data": str(chips), "out": str(root / "out"), "unimodal_steps": 3, "fusion_steps": 3, "warmup_steps": 1,
           "freeze_backbone_steps": 1, "checkpoint_every": 2, "log_every": 1, "batch_size": 2, "evaluate": False,
           "rot90": True, "flips": True}
    (root / "train.yaml").write_text(yaml.safe_dump(cfg))
    tc = load_train_config(root / "train.yaml")
    lines: list[str] = []
    run = train(tc, "all", progress=lines.append)
    return tc, run, lines


def test_training_writes_safetensors_checkpoints_and_records(trained):
    from safetensors import safe_open

    tc, run, lines = trained
    assert set(run["stages"]) == {"unimodal_optical", "unimodal_sar", "unimodal_dem", "fusion"}
    assert any("step 3/3 loss=" in line for line in lines)
    for name, record in run["stages"].items():
        stage = Path(tc.out) / name
        assert record["steps"] == 3 and record["seed"] == 0 and record["train_seconds"] > 0
        with safe_open(str(stage / "step_000003.safetensors"), framework="pt") as f:
            assert any(k.startswith("backbone.encoders.") for k in f.keys())
        sidecar = json.loads((stage / "step_000003.json").read_text())
        assert sidecar["step"] == 3 and sidecar["model_config"]["tile_size"] == TILE
        # Optimizer state loads under weights_only (nothing arbitrary is unpickled).
        state = torch.load(stage / "step_000003.optim.pt", weights_only=True)
        assert state["state"]
        assert json.loads((stage / "record.json").read_text())["stage"] == name
    assert json.loads((Path(tc.out) / "run.json").read_text())["stages"]["fusion"]["steps"] == 3


def test_resume_continues_the_step_counter_and_matches_an_uninterrupted_run(trained):
    from rtsmap.models.train import read_weights, train

    tc, _, _ = trained
    stage = Path(tc.out) / "unimodal_optical"
    final, _, _ = read_weights(stage / "step_000003.safetensors")
    # Interrupt after step 2: step 3 and the final files were never written.
    for name in ("step_000003.json", "step_000003.safetensors", "step_000003.optim.pt", "model.safetensors", "record.json"):
        (stage / name).unlink()
    lines: list[str] = []
    run = train(dataclasses.replace(tc, modalities=("optical",)), "unimodal", progress=lines.append)
    record = run["stages"]["unimodal_optical"]
    assert record["resumed_from"] == 2 and record["steps"] == 3
    assert any("resuming from step_000002" in line for line in lines)
    assert not any("step 1/3" in line for line in lines)
    again, _, _ = read_weights(stage / "model.safetensors")
    for key in final:
        torch.testing.assert_close(again[key], final[key], rtol=1e-4, atol=1e-5)
    # A finished stage is skipped on rerun.
    lines.clear()
    train(dataclasses.replace(tc, modalities=("optical",)), "unimodal", progress=lines.append)
    assert lines == []


def test_fused_model_starts_as_the_optical_model(trained):
    from rtsmap.models.data import ChipDataset, collate
    from rtsmap.models.train import build_fused_model, load_detector, stage_model_config

    tc, _, _ = trained
    out = Path(tc.out)
    fused = build_fused_model(stage_model_config(tc, tc.modalities, tc.fusion),
                              {m: out / f"unimodal_{m}" for m in tc.modalities}).eval()
    optical = load_detector(out / "unimodal_optical")
    # Everything the detector would report (score threshold 0), not only confident detections.
    fused.config = dataclasses.replace(fused.config, candidate_score_threshold=0.0)
    optical.config = dataclasses.replace(optical.config, candidate_score_threshold=0.0)
    data = ChipDataset(tc.data, "all", fused.config.modalities, fused.config.normalization)
    inputs, _ = collate([data[i] for i in range(2)])
    assert inputs["sar"].abs().sum() > 0 and inputs["dem"].abs().sum() > 0
    with torch.no_grad():
        a = fused(inputs)
        b = optical({"optical": inputs["optical"]})
    assert int(b["num_detections"].sum()) > 0
    for key in ("boxes", "scores", "masks", "num_detections"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4)
    # The gates are what keeps them equal: open one and the outputs change.
    with torch.no_grad():
        for fusion in fused.backbone.fusions.values():
            fusion.gate.fill_(1.0)
        c = fused(inputs)
    assert not torch.allclose(c["scores"], b["scores"])


def test_data_level_study_run_starts_from_the_optical_checkpoint(trained, tmp_path):
    """unimodal_from: stage 2 of another fusion mode from the same pretraining, stage 1 not rerun."""
    from rtsmap.models.data import ChipDataset, collate
    from rtsmap.models.train import build_fused_model, load_detector, stage_model_config, train

    tc, _, _ = trained
    study = dataclasses.replace(tc, out=str(tmp_path / "study"), fusion="data_level", unimodal_from=tc.out)
    config = stage_model_config(study, study.modalities, "data_level")
    fused = build_fused_model(config, {"optical": Path(tc.out) / "unimodal_optical"}).eval()
    optical = load_detector(Path(tc.out) / "unimodal_optical")
    fused.config = dataclasses.replace(fused.config, candidate_score_threshold=0.0)
    optical.config = dataclasses.replace(optical.config, candidate_score_threshold=0.0)
    data = ChipDataset(tc.data, "all", fused.config.modalities, fused.config.normalization)
    inputs, _ = collate([data[i] for i in range(2)])
    with torch.no_grad():
        a, b = fused(inputs), optical({"optical": inputs["optical"]})
    for key in ("boxes", "scores", "num_detections"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4)
    lines: list[str] = []
    run = train(study, "all", progress=lines.append)
    assert set(run["stages"]) == {"fusion"}
    assert not (tmp_path / "study" / "unimodal_optical").exists()
    assert load_detector(tmp_path / "study" / "fusion").config.fusion == "data_level"


def test_fused_stage_with_modality_dropout(trained, tmp_path, monkeypatch):
    """modality_dropout: the fused stage feeds dropped modalities as zeros with presence 0 (never
    all of a chip's), and the model it writes lists the subsets it was trained for."""
    from rtsmap.contract import modality_subsets
    from rtsmap.models.detector import RTSDetector
    from rtsmap.models.train import load_detector, train

    tc, _, _ = trained
    rates = {"optical": 0.5, "sar": 0.5, "dem": 0.5}
    study = dataclasses.replace(tc, out=str(tmp_path / "dropout"), unimodal_from=tc.out, fusion_steps=4,
                                modality_dropout=rates, evaluate=True)
    seen = []
    real_forward = RTSDetector.forward

    def spy(self, inputs, targets=None, presence=None):  # the real forward, its arguments kept
        if self.training:
            seen.append(({m: x.clone() for m, x in inputs.items()}, None if presence is None else presence.clone()))
        return real_forward(self, inputs, targets, presence)

    monkeypatch.setattr(RTSDetector, "forward", spy)
    run = train(study, "all", progress=lambda line: None)
    assert set(run["stages"]) == {"fusion"} and run["stages"]["fusion"]["steps"] == 4
    # Validation with each single modality absent too (on the val split, or the note that it is empty).
    metrics = run["stages"]["fusion"]["metrics"]
    if metrics["val"] is not None:
        assert set(metrics) == {"val", "val_optical+sar", "val_optical+dem", "val_sar+dem"}, metrics
        assert all(m["chips"] == metrics["val"]["chips"] > 0 for m in metrics.values())
    else:
        assert "no chips" in metrics["note"]
    assert len(seen) == 4 and all(p is not None for _, p in seen)
    flags = torch.cat([p for _, p in seen])
    assert flags.shape == (4 * tc.batch_size, 3) and (flags.sum(1) >= 1).all() and (flags == 0).any()
    for inputs, presence in seen:
        for i, m in enumerate(("optical", "sar", "dem")):
            for b in range(presence.shape[0]):
                if presence[b, i] == 0:
                    assert inputs[m][b].abs().sum() == 0, (m, b)  # the fill: zeros
    model = load_detector(tmp_path / "dropout" / "fusion")
    assert model.config.modality_subsets == modality_subsets(("optical", "sar", "dem"), rates)
    # Exported, it runs with SAR absent as the checkpoint does; evaluation can ask for a subset.
    from rtsmap.models.evaluate import evaluate_model
    from rtsmap.models.export import export_onnx

    monkeypatch.undo()
    onnx_path = tmp_path / "dropout.onnx"
    meta = export_onnx(model, model.config, onnx_path)
    assert len(meta["modality_subsets"]) == 7 and meta["format"] == "rtsmap-model/2"
    no_sar = {}
    for path in (tmp_path / "dropout" / "fusion", onnx_path):
        no_sar[path.suffix] = evaluate_model(path, tc.data, "all", present=["optical", "dem"], score_threshold=0.0)
    assert no_sar[""]["chips"] == no_sar[".onnx"]["chips"] >= 40
    from rtsmap.workflows.model_commands import evaluate_command

    result = CliRunner().invoke(evaluate_command, ["--model", str(onnx_path), "--data", str(tc.data), "--split", "all",
                                                   "--without", "sar", "--score-threshold", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["segm_AP"] == no_sar[".onnx"]["segm_AP"]
    assert abs(no_sar[""]["tp"] + no_sar[""]["fp"] - no_sar[".onnx"]["tp"] - no_sar[".onnx"]["fp"]) <= 2
    assert abs(no_sar[""]["segm_AP"] - no_sar[".onnx"]["segm_AP"]) <= 0.02


def test_train_command_repeats_a_config_with_another_seed_and_output(trained, tmp_path):
    """`rtsmap train --seed N --out DIR`: the same config, another seed, its own folder."""
    from click.testing import CliRunner

    from rtsmap.workflows.cli import cli

    tc, _, _ = trained
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"data": tc.data, "out": str(tmp_path / "unused"), "unimodal_from": tc.out,
                                      "fusion_steps": 2, "warmup_steps": 1, "freeze_backbone_steps": 0,
                                      "batch_size": 2, "evaluate": False, "checkpoint_every": 2}))
    result = CliRunner().invoke(cli, ["train", "--config", str(config), "--seed", "7", "--out", str(tmp_path / "seed7")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "seed7" / "fusion" / "record.json").read_text())
    assert record["seed"] == 7 and record["steps"] == 2
    assert not (tmp_path / "unused").exists()


def test_metrics_wiring_with_stand_in_predictions(chips):
    # A stand-in prediction set built from the ground truth itself, at the metric boundary:
    # it tests the pycocotools wiring (AP = 1 for perfect predictions, lower when perturbed),
    # not a model.
    from pycocotools import mask as mask_utils

    from rtsmap.models.data import ChipDataset
    from rtsmap.models.evaluate import coco_metrics

    data = ChipDataset(chips, "all", {"optical": ("blue",)}, {"optical": {"mean": [0.0], "std": [1.0]}})
    gt = data.coco
    perfect = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in gt["annotations"]]
    m = coco_metrics(gt, perfect)
    assert m["bbox_AP"] == pytest.approx(1.0) and m["segm_AP"] == pytest.approx(1.0)
    assert m["segm_AP50"] == pytest.approx(1.0) and m["f1"] == 1.0 and m["fp"] == 0

    perturbed = []
    for k, a in enumerate(gt["annotations"]):
        mask = mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
        mask = np.roll(mask, 4 if k % 2 else 0, axis=1)  # every second instance shifted 4 px
        rle = mask_utils.encode(np.asfortranarray(mask))
        x, y, w, h = a["bbox"]
        perturbed.append({"image_id": a["image_id"], "category_id": 1, "bbox": [x + (4 if k % 2 else 0), y, w, h],
                          "score": 0.9, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    perturbed = perturbed[1:]  # and one instance missed
    p = coco_metrics(gt, perturbed)
    assert p["segm_AP"] < 0.95 and p["bbox_AP"] < 0.95 and p["fn"] >= 1 and p["recall"] < 1.0
    assert coco_metrics(gt, [])["segm_AP"] == 0.0
    # The missed instance found with a low score: AP counts it, F1 at the operating point not.
    low = dict(perfect[0], score=0.1)
    q = coco_metrics(gt, perturbed + [low], score_threshold=0.5)
    assert q["segm_AP"] > p["segm_AP"] and q["fn"] == p["fn"] and q["f1"] == p["f1"]
    assert coco_metrics(gt, perturbed + [low], score_threshold=0.05)["fn"] == p["fn"] - 1


def test_export_and_evaluate_onnx_end_to_end(trained, chips, tmp_path, capsys):
    from rtsmap.workflows.model_commands import evaluate_command, export_command

    tc, _, _ = trained
    onnx_path = tmp_path / "fused.onnx"
    runner = CliRunner()
    result = runner.invoke(export_command, ["--checkpoint", str(Path(tc.out) / "fusion"), "--out", str(onnx_path)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(evaluate_command, ["--model", str(onnx_path), "--data", str(chips), "--split", "all", "--json"])
    assert result.exit_code == 0, result.output
    onnx_metrics = json.loads(result.output)
    assert onnx_metrics["chips"] >= 40 and onnx_metrics["instances"] > 0
    assert set(onnx_metrics) >= {"bbox_AP", "segm_AP", "segm_AP50", "segm_AP75", "f1"}
    # The same checkpoint in PyTorch gives the same detections, hence the same counts.
    result = runner.invoke(evaluate_command, ["--model", str(Path(tc.out) / "fusion"), "--data", str(chips),
                                              "--split", "all", "--json"])
    assert result.exit_code == 0, result.output
    torch_metrics = json.loads(result.output)
    assert abs(torch_metrics["tp"] + torch_metrics["fp"] - onnx_metrics["tp"] - onnx_metrics["fp"]) <= 2
    # The operating point moves F1 only; AP is over the whole ranked list. Export stores it.
    result = runner.invoke(evaluate_command, ["--model", str(onnx_path), "--data", str(chips), "--split", "all",
                                              "--json", "--score-threshold", "1.0"])
    strict = json.loads(result.output)
    assert strict["score_threshold"] == 1.0 and strict["tp"] + strict["fp"] == 0
    assert strict["segm_AP"] == onnx_metrics["segm_AP"]
    result = runner.invoke(export_command, ["--checkpoint", str(Path(tc.out) / "fusion"), "--out",
                                            str(tmp_path / "t03.onnx"), "--score-threshold", "0.3"])
    assert result.exit_code == 0, result.output
    from rtsmap.models.export import read_model_metadata
    assert read_model_metadata(tmp_path / "t03.onnx")["score_threshold"] == 0.3
    # Trained without modality dropout: it lists only the full set and refuses a subset.
    from rtsmap.models.evaluate import evaluate_model

    assert read_model_metadata(onnx_path)["modality_subsets"] == [["optical", "sar", "dem"]]
    for path in (onnx_path, Path(tc.out) / "fusion"):
        with pytest.raises(ValueError, match="not trained for modalities"):
            evaluate_model(path, chips, "all", present=["optical", "dem"])
    # The command says so in one line; `--without` names only the model's modalities, never all.
    from rtsmap.workflows.cli import main

    for args, message in ((["--without", "sar"], "not trained for modalities"),
                          (["--without", "optical", "--without", "sar", "--without", "dem"], "must be left")):
        with pytest.raises(SystemExit) as exit_:
            main(["evaluate", "--model", str(onnx_path), "--data", str(chips), *args])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_recall_by_optical_view_splits_slumps_by_what_optical_sees(chips):
    # Stand-in predictions (the ground truth itself) at the metric boundary: this checks the
    # grouping by optical validity and the recall wiring, not a model.
    from rtsmap.models.data import ChipDataset
    from benchmarks.fusion_study import recall_by_optical_view

    data = ChipDataset(chips, "all", {"optical": ("blue",)}, {"optical": {"mean": [0.0], "std": [1.0]}})
    total = len(data.coco["annotations"])
    perfect = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in data.coco["annotations"]]
    found = recall_by_optical_view(perfect, data, score_threshold=0.5)
    assert found["visible"]["instances"] + found["hidden"]["instances"] == total
    assert found["hidden"]["instances"] > 0, "the demo region hides some slumps under cloud"
    assert found["visible"]["recall"] == found["hidden"]["recall"] == 1.0
    # At the operating point a result counts (the contract's >= rule), above it nothing does; the
    # threshold of "hidden" moves slumps between groups.
    assert recall_by_optical_view(perfect, data, score_threshold=1.0)["visible"]["recall"] == 1.0
    assert recall_by_optical_view(perfect, data, score_threshold=1.0001)["visible"]["tp"] == 0
    assert recall_by_optical_view(perfect, data, 0.5, hidden=0.0)["hidden"]["instances"] == total
    assert recall_by_optical_view(perfect, data, 0.5, hidden=1.01)["visible"]["instances"] == total


def test_fusion_study_exports_evaluates_and_runs_each_model(trained, chips, demo_region, tmp_path):
    """The study script over one tiny checkpoint: ONNX, test and held-out metrics, a whole run, a table."""
    from benchmarks.fusion_study import format_robustness, format_table, study

    tc, _, _ = trained
    results = study({"fused": Path(tc.out) / "fusion"}, chips, demo_region.root, tmp_path / "study",
                    heldout_chips=chips)
    assert json.loads((tmp_path / "study" / "results.json").read_text()) == json.loads(json.dumps(results, default=str))
    r = results["fused"]
    assert (tmp_path / "study" / "fused.onnx").is_file() and (tmp_path / "study" / "fused.gpkg").is_file()
    assert r["training"]["stage"] == "fusion" and r["training"]["steps"] == 3 and r["training"]["seed"] == 0
    assert r["heldout_chips"]["instances"] == len(_coco(chips)["annotations"])
    assert r["test_split"]["split"] == "test" and r["test_split"]["instances"] < r["heldout_chips"]["instances"]
    views = r["recall_by_optical_view"]
    assert views["visible"]["instances"] + views["hidden"]["instances"] == r["heldout_chips"]["instances"]
    assert sorted(r["end_to_end"]) == ["2021", "2022", "2023"]
    table = format_table(results).splitlines()
    assert len(table) == 3 and table[2].startswith("| fused |") and table[0].count("|") == table[2].count("|")
    # Trained without modality dropout: no subset to evaluate, n/a in the robustness table.
    assert r["heldout_without"] == {}
    robust = format_robustness(results).splitlines()
    assert robust[2].startswith("| fused |") and robust[2].count("n/a") == 6 and robust[0].count("|") == robust[2].count("|")


def test_train_config_refuses_unknown_keys(tmp_path):
    from rtsmap.models.train import load_train_config

    (tmp_path / "bad.yaml").write_text("data: x\nout: y\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown key 'learning_rate'"):
        load_train_config(tmp_path / "bad.yaml")
    (tmp_path / "null.yaml").write_text("data: null\nout: y\n")
    with pytest.raises(ValueError, match="'data' is required"):
        load_train_config(tmp_path / "null.yaml")
    with pytest.raises(ValueError, match="seed: must be >= 0"):  # numpy's seeding would say only "expected non-negative integer"
        load_train_config(tmp_path / "null.yaml", data="x", seed=-1)


def test_fusion_gates_get_their_own_learning_rate():
    """The zero-initialised residual gates learn at gate_lr_scale x the scheduled rate, without decay."""
    from rtsmap.models.config import build_config
    from rtsmap.models.detector import RTSDetector
    from rtsmap.models.train import make_optimizer

    torch.manual_seed(0)
    model = RTSDetector(build_config("demo", tile_size=64, fusion="residual_attention", fusion_gate="channel"))
    optimizer = make_optimizer(model, weight_decay=0.05, gate_lr_scale=30.0)
    gate_ids = {id(p) for n, p in model.named_parameters() if n.endswith(".gate")}
    assert len(gate_ids) == 5  # one per FPN level, P2..P6
    (gates,) = [g for g in optimizer.param_groups if "lr_scale" in g]
    assert {id(p) for p in gates["params"]} == gate_ids
    assert gates["lr_scale"] == 30.0 and gates["weight_decay"] == 0.0
    others = [id(p) for g in optimizer.param_groups if "lr_scale" not in g for p in g["params"]]
    assert not gate_ids & set(others)
    # A unimodal model has no gates and no gate group.
    unimodal = RTSDetector(build_config("demo", tile_size=64, fusion="none", modalities={"optical": ("blue", "green", "red", "nir")}))
    assert all("lr_scale" not in g for g in make_optimizer(unimodal, 0.05, 30.0).param_groups)
    # The query gate's weights are gate parameters too.
    query = RTSDetector(build_config("demo", tile_size=64, fusion="residual_attention", fusion_gate="query"))
    (gates,) = [g for g in make_optimizer(query, 0.05, 30.0).param_groups if "lr_scale" in g]
    assert len(gates["params"]) == 10
