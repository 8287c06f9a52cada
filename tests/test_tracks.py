"""Tracks across years (pipeline/tracks.py) and their evaluation (pipeline/evaluation.py).

Hand-made layers check each rule (growth, stable, merge, split, new, a no-data year, not seen);
the synthetic demo region (tests/conftest.py), whose truth carries slump_id through the years,
checks the whole: its true polygons, perturbed as a detector would (boundary noise, a shift,
a few misses), are linked and scored against the truth.
"""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely

from rtsmap.pipeline.evaluation import evaluate_change, evaluate_tracking, read_truth
from rtsmap.pipeline.inventory import write_inventory
from rtsmap.pipeline.tracks import TrackRules, link_years, processed_fraction, track_id_of

CRS = "EPSG:3413"


def layer(year, geoms, names=None):
    names = names or [f"{year}_{k}" for k in range(len(geoms))]
    return gpd.GeoDataFrame({"rts_id": names, "year": [year] * len(geoms), "score": [0.9] * len(geoms),
                             "UID": [f"uid-{n}" for n in names]}, geometry=list(geoms), crs=CRS)


def coverage(processed, no_data=None):
    rows = [{"status": "processed", "reason": "", "geometry": processed}]
    if no_data is not None:
        rows.append({"status": "no_data", "reason": "cloud", "geometry": no_data})
    return gpd.GeoDataFrame(rows, geometry="geometry", crs=CRS)


WORLD = shapely.box(-1e7, -1e7, 1e7, 1e7)  # every EPSG:3413 place of the tests


def test_growing_slump_is_one_track_with_its_growth():
    # Headwall retreat of 20 m/yr northward on a 100 m wide slump.
    geoms = {y: shapely.box(0, 0, 100, 80 + 20 * (y - 2021)) for y in (2021, 2022, 2023)}
    out, tracks = link_years({y: layer(y, [g]) for y, g in geoms.items()}, {y: coverage(WORLD) for y in geoms})
    ids = {out[y]["track_id"].iloc[0] for y in geoms}
    assert ids == {track_id_of("uid-2021_0")}
    assert [out[y]["change"].iloc[0] for y in geoms] == ["first_seen", "grown", "grown"]
    assert out[2022]["area_change_m2"].iloc[0] == pytest.approx(2000.0)
    assert out[2022]["prev_year"].iloc[0] == 2021
    assert all(out[y]["StabilizedRTS"].iloc[0] == "" for y in geoms)
    row = tracks.iloc[0]
    assert len(tracks) == 1 and row.status == "active" and row.years_seen == "2021,2022,2023"
    assert (row.first_year, row.last_year, row.n_years) == (2021, 2023, 3)
    assert row["area_m2_2023"] == pytest.approx(12000.0) and row["area_change_m2_2023"] == pytest.approx(2000.0)
    assert row.growth_m2_per_yr == pytest.approx(2000.0)
    assert row.retreat_m == pytest.approx(40.0)
    assert row.growth_azimuth_deg == pytest.approx(0.0, abs=1e-6)  # grid north


def test_stable_slump_lists_its_predecessor_and_is_stabilised():
    g = shapely.box(0, 0, 100, 100)
    out, tracks = link_years({2021: layer(2021, [g]), 2022: layer(2022, [g.buffer(1, join_style="mitre")])})
    row = out[2022].iloc[0]
    assert row.change == "stable" and row.StabilizedRTS == "uid-2021_0"  # +404 m2: below 500 m2
    assert tracks.status.tolist() == ["stabilised"] and np.isnan(tracks.growth_azimuth_deg.iloc[0])


def test_merge_and_split_fill_the_arts_fields():
    a, b = shapely.box(0, 0, 100, 100), shapely.box(120, 0, 200, 100)
    both = shapely.box(0, 0, 200, 110)
    out, tracks = link_years({2021: layer(2021, [a, b]), 2022: layer(2022, [both]),
                              2023: layer(2023, [shapely.box(0, 0, 95, 110), shapely.box(105, 0, 200, 110)])})
    merged = out[2022].iloc[0]
    assert merged.change == "merged" and merged.MergedRTS == "uid-2021_0,uid-2021_1"
    assert merged.track_id == track_id_of("uid-2021_0")  # the larger overlap continues
    ended = tracks.set_index("track_id").loc[track_id_of("uid-2021_1")]
    assert ended.status == "merged" and ended.merged_into == merged.track_id and ended.last_year == 2021
    pieces = out[2023]
    assert set(pieces.change) == {"split"} and set(pieces.SplitRTS) == {"uid-2022_0"}
    assert set(pieces.track_id) == {merged.track_id, track_id_of("uid-2023_1")}
    child = tracks.set_index("track_id").loc[track_id_of("uid-2023_1")]
    assert child.split_from == merged.track_id and child.first_year == 2023
    # A split track's area is shared among the pieces: no spurious growth.
    assert pieces.area_change_m2.abs().max() < 0.05 * both.area


def test_new_needs_ground_seen_before():
    old = shapely.box(0, 0, 100, 100)
    new_seen, new_unseen = shapely.box(1000, 0, 1100, 100), shapely.box(3000, 0, 3100, 100)
    cov = {2021: coverage(shapely.box(-500, -500, 2000, 500), no_data=shapely.box(2500, -500, 4000, 500)),
           2022: coverage(WORLD)}
    out, _ = link_years({2021: layer(2021, [old]), 2022: layer(2022, [old, new_seen, new_unseen])}, cov)
    assert out[2022].change.tolist() == ["stable", "new", "first_seen"]
    assert out[2021].change.tolist() == ["first_seen"]


def test_no_data_year_keeps_the_track_open_and_not_seen_ends_it():
    g = shapely.box(0, 0, 100, 100)
    cov_gap = coverage(shapely.box(500, -500, 1000, 500), no_data=shapely.box(-500, -500, 500, 500))
    out, tracks = link_years({2021: layer(2021, [g]), 2022: layer(2022, []), 2023: layer(2023, [g.buffer(15)])},
                             {2021: coverage(WORLD), 2022: cov_gap, 2023: coverage(WORLD)})
    assert out[2023].track_id.iloc[0] == out[2021].track_id.iloc[0]
    assert out[2023].prev_year.iloc[0] == 2021 and out[2023].change.iloc[0] == "grown"
    assert tracks.years_seen.tolist() == ["2021,2023"]
    # The same with the ground processed in 2022: the slump was not there. Its track ends; the
    # slump mapped again in 2023 is new, formed on the scar the first one left (NewRTS).
    out, tracks = link_years({2021: layer(2021, [g]), 2022: layer(2022, []), 2023: layer(2023, [g.buffer(15)])},
                             {y: coverage(WORLD) for y in (2021, 2022, 2023)})
    row = out[2023].iloc[0]
    assert row.track_id != out[2021].track_id.iloc[0] and row.change == "new" and row.NewRTS == "uid-2021_0"
    assert sorted(tracks.status) == ["active", "not_seen"]
    # Status "no_data": last year not processed over the track.
    _, tracks = link_years({2021: layer(2021, [g]), 2022: layer(2022, [])}, {2021: coverage(WORLD), 2022: cov_gap})
    assert tracks.status.tolist() == ["no_data"]


def test_slight_overlap_is_an_unknown_relationship_not_a_link():
    a = shapely.box(0, 0, 100, 100)
    b = shapely.box(90, 0, 190, 100)  # 10 % of the smaller
    out, _ = link_years({2021: layer(2021, [a]), 2022: layer(2022, [b])})
    assert out[2022].UnknownRelationship.iloc[0] == "uid-2021_0"
    assert out[2022].track_id.iloc[0] != out[2021].track_id.iloc[0]
    out, _ = link_years({2021: layer(2021, [a]), 2022: layer(2022, [b])}, rules=TrackRules(link_ios=0.05))
    assert out[2022].track_id.iloc[0] == out[2021].track_id.iloc[0]


def test_processed_fraction_sums_coverage_pieces():
    cov = gpd.GeoDataFrame({"status": ["processed", "processed", "no_data"]},
                           geometry=[shapely.box(0, 0, 50, 100), shapely.box(50, 0, 75, 100), shapely.box(75, 0, 100, 100)],
                           crs=CRS)
    assert processed_fraction([shapely.box(0, 0, 100, 100)], cov) == pytest.approx([0.75])
    assert processed_fraction([shapely.box(0, 0, 100, 100)], None) == pytest.approx([1.0])


# ---- the demo region: truth with identities ----

def stand_in_detections(truth, seed, *, miss=0.03, noise_m=2.0):
    """The true polygons as a detector would return them: boundary noise, a small shift, misses."""
    rng = np.random.default_rng(seed)
    out = {}
    for y, t in truth.items():
        geoms, names = [], []
        for k, g in enumerate(t.geometry):
            if rng.random() < miss:
                continue
            g = shapely.affinity.translate(g.buffer(rng.normal(0, noise_m)), *rng.normal(0, noise_m / 2, 2))
            if not g.is_empty:
                geoms.append(g)
                names.append(f"{y}_{k}")
        out[y] = layer(y, geoms, names)
    return out


def test_demo_region_tracks_score_well(demo_region):
    truth = read_truth(demo_region.truth)
    assert {"slump_id", "first_year"} <= set(truth[2021].columns)
    perfect, tracks = link_years({y: layer(y, list(t.geometry)) for y, t in truth.items()})
    scores = evaluate_tracking(perfect, truth)
    # The truth itself: every slump one track, every new slump found, no change error.
    assert scores["tracked_whole"] == 1.0 and scores["id_switches"] == 0
    assert scores["new"]["f1"] == 1.0 and scores["new"]["tp"] == sum(v["true_new"] for v in scores["new_by_year"].values())
    assert scores["area_change"]["mean_abs_error_m2"] == pytest.approx(0.0, abs=1e-6)
    assert scores["true_slumps_multi_year"] > 5
    assert set(tracks.status) <= {"active", "stabilised"}
    # Detector-like noise (2 m boundary, 1 m shift) and 3 % misses: slumps matched in several
    # years keep one track; a miss ends a track (tracked_whole counts it); new slumps are found.
    noisy, _ = link_years(stand_in_detections(truth, 1))
    scores = evaluate_tracking(noisy, truth)
    assert scores["consistent_when_matched"] >= 0.9 and scores["id_switches"] <= 1
    assert scores["tracked_whole"] >= 0.6
    assert scores["new"]["recall"] >= 0.75
    assert 0 < scores["area_change"]["mean_abs_error_m2"] < 2 * scores["area_change"]["mean_abs_true_change_m2"]


def test_evaluate_change_from_files(demo_region, tmp_path):
    truth = read_truth(demo_region.truth)
    layers = stand_in_detections(truth, 2, miss=0.0)
    path = write_inventory(tmp_path / "inv.gpkg", layers, {y: coverage(WORLD) for y in layers},
                           {"software_version": "test"})
    scores = evaluate_change(path, demo_region.truth)  # the file has no track_id yet: linked here
    assert scores["years"] == sorted(truth) and scores["consistent_when_matched"] >= 0.9
    assert scores["new"]["tp"] >= 1 and scores["area_change"]["pairs"] >= 5


def test_input_order_does_not_change_track_ids(demo_region):
    truth = read_truth(demo_region.truth)
    layers = stand_in_detections(truth, 3)
    a, ta = link_years(layers)
    b, tb = link_years({y: g.sample(frac=1.0, random_state=5) for y, g in layers.items()})
    for y in a:
        key = lambda f: f.sort_values("UID")[["UID", "track_id", "change", "MergedRTS", "SplitRTS"]].reset_index(drop=True)
        assert key(a[y]).equals(key(b[y]))
    assert ta.drop(columns=[]).equals(tb)
