"""Tracking figures of docs/tracking.md: synthetic regions, their true polygons as stand-in detections
(boundary noise, shift, misses: tests/test_tracks.py stand_in_detections), linked and scored.

Run: .venv/bin/python benchmarks/tracking_figures.py   (about a minute on one core)
"""
import json, sys, tempfile
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
from test_tracks import stand_in_detections, layer
from rtsmap.pipeline.evaluation import evaluate_tracking, read_truth
from rtsmap.pipeline.merge import overlapping_pairs
from rtsmap.pipeline.tracks import link_years
from rtsmap.workflows.demo_region import generate_region

for seed, size in ((0, 2500.0), (17, 4000.0)):
    r = generate_region(tempfile.mkdtemp(), seed=seed, years=(2021, 2022, 2023), size_m=(size, size))
    truth = read_truth(r.truth)
    for miss, noise in ((0.0, 0.0), (0.0, 2.0), (0.03, 2.0), (0.03, 4.0)):
        dets = stand_in_detections(truth, 1, miss=miss, noise_m=noise) if noise or miss else {y: layer(y, list(t.geometry)) for y, t in truth.items()}
        linked, tracks = link_years(dets)
        s = evaluate_tracking(linked, truth)
        ov = sum(len(overlapping_pairs(d.geometry.values, 0.5)[0]) for d in dets.values())
        print(json.dumps({"seed": seed, "size_km": size / 1000, "miss": miss, "noise_m": noise, "slumps": {y: len(t) for y, t in truth.items()},
                          "multi_year": s["true_slumps_multi_year"], "tracked_whole": round(s["tracked_whole"], 3),
                          "consistent": round(s["consistent_when_matched"], 3), "switches": s["id_switches"],
                          "new_p": round(s["new"]["precision"], 3), "new_r": round(s["new"]["recall"], 3), "new_f1": round(s["new"]["f1"], 3),
                          "dA_mae": round(s["area_change"]["mean_abs_error_m2"]), "dA_true": round(s["area_change"]["mean_abs_true_change_m2"]),
                          "grown_agree": round(s["area_change"]["grown_call_agreement"], 3), "status": tracks.status.value_counts().to_dict(),
                          "overlap_pairs_over_half": ov}))
