"""The one strict reader (rtsmap.config_schema) behind run configs, profiles and training configs.

Bad files go through the real CLI entry point (``rtsmap.workflows.cli.main``, in this process
so that the table stays cheap; one case per kind also runs as a subprocess) and must end in one
line ``error: <file>: ...`` naming the key, with exit status 2. Property tests feed the reader
random mappings: it returns a valid config or raises ConfigError, never anything else.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtsmap.config_schema import read_yaml, validate
from rtsmap.errors import ConfigError
from rtsmap.pipeline import errors as pipeline_errors
from rtsmap.pipeline.profiles import CatalogProfile, load_profile
from rtsmap.workflows.cli import main
from rtsmap.workflows.config import RunConfig, load_run_config

RTSMAP = [sys.executable, "-m", "rtsmap.workflows.cli"]

GOOD_PROFILE = (
    "name: x\n"
    "modalities:\n"
    "  dem:\n"
    "    collections: [c]\n"
    "    per_year: false\n"
    "    bands: [{name: e, asset: d, scale: 1.0}]\n"
)

# (kind, file text, text the one line must hold besides the file name)
CASES = [
    # run configuration (rtsmap run --config)
    ("run", "inference: {batch_sise: 8}\n", "unknown key 'inference.batch_sise'"),
    ("run", 'grid: {"tiles\\n": 8}\n', "unknown key 'grid.tiles\\n'"),  # a newline in a key stays escaped: one line
    ("run", "inference: {batch_size: abc}\n", "inference.batch_size: expected an integer >= 1, got 'abc'"),
    ("run", "cluster: {timeout_s: 1e-4x}\n", "cluster.timeout_s: expected a number > 0, got '1e-4x'"),
    ("run", "cluster: {jobs: true}\n", "cluster.jobs: expected an integer >= 1, got true"),
    ("run", "inference: {batch_size: 0}\n", "inference.batch_size: must be >= 1, got 0"),
    ("run", "years: [1850]\n", "years: 1850 is outside 1950-2100"),
    ("run", "inference: {batch_size: [\n", "is not valid YAML at line 2"),
    ("run", "", "is empty"),
    ("run", "- years\n", "must be a mapping"),
    ("run", "out: a.gpkg\nout: b.gpkg\n", "key 'out' is given twice"),
    # catalog profile (rtsmap plan --profile)
    ("profile", GOOD_PROFILE.replace("per_year", "per_yaer"), "unknown key 'profile.modalities.dem.per_yaer'"),
    ("profile", GOOD_PROFILE.replace("collections: [c]", "collections: c"), "profile.modalities.dem.collections: expected a list"),
    ("profile", GOOD_PROFILE.replace("scale: 1.0", "scale: 1e-4x"), "profile.modalities.dem.bands[0].scale: expected a number, got '1e-4x'"),
    ("profile", GOOD_PROFILE.replace("per_year: false", "per_year: 0"), "profile.modalities.dem.per_year: expected true or false, got 0"),
    ("profile", GOOD_PROFILE + "    max_cloud: 120\n    cloud_property: eo:cloud_cover\n", "profile.modalities.dem.max_cloud: must be in [0, 100]"),
    ("profile", GOOD_PROFILE + "  : [\n", "is not valid YAML at line"),
    ("profile", "# nothing\n", "is empty"),
    ("profile", "just text\n", "must be a mapping of keys to values, not a string"),
    # training configuration (rtsmap train --config)
    ("train", "data: x\nout: y\nlearning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("train", "data: x\nout: y\nseed: one\n", "seed: expected an integer >= 0, got 'one'"),
    ("train", "data: x\nout: y\nlr: fast\n", "lr: expected a number > 0, got 'fast'"),
    ("train", "data: x\nout: y\nbatch_size: true\n", "batch_size: expected an integer >= 1, got true"),
    ("train", "data: x\nout: y\nmin_lr_ratio: 1.5\n", "min_lr_ratio: must be in [0, 1], got 1.5"),
    ("train", "data: x\nout: y\nlr: 1e-4\nmodel_overrides: {score_threshold: 2}\n", "model_overrides: ModelConfig.score_threshold"),
    ("train", "data: x\nout: y\nlr: [1\n", "is not valid YAML at line"),
    ("train", "", "is empty"),
    ("train", "42\n", "must be a mapping of keys to values, not a number"),
    ("train", "out: y\n", "'data' is required"),
]


@pytest.fixture(scope="module")
def aoi(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("aoi") / "aoi.geojson"
    ring = [[-135.3, 67.4], [-135.2, 67.4], [-135.2, 67.45], [-135.3, 67.45], [-135.3, 67.4]]
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    return path


def _argv(kind: str, path: Path, aoi: Path) -> list[str]:
    if kind == "run":
        return ["run", "--aoi", str(aoi), "--config", str(path)]
    if kind == "profile":
        return ["plan", "--aoi", str(aoi), "--years", "2021", "--profile", str(path)]
    return ["train", "--config", str(path)]


@pytest.mark.parametrize(("kind", "text", "expected"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_file_ends_in_one_line_naming_file_and_key(kind, text, expected, tmp_path, aoi, capsys):
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(_argv(kind, path, aoi))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: "), err
    assert expected in err, err


@pytest.mark.parametrize("kind", ["run", "profile", "train"])
def test_bad_file_in_a_real_process(kind, tmp_path, aoi):
    """The same through the installed entry point: no traceback, no log noise."""
    path = tmp_path / f"{kind}.yaml"
    path.write_text({"run": "inference: {batch_size: true}\n", "profile": "name: 3\n", "train": "data: x\nout: y\nlr: '-1'\n"}[kind])
    proc = subprocess.run(RTSMAP + _argv(kind, path, aoi), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "Warning" not in line and line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_string_floats_are_read_as_numbers(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot) as a string; float fields take it, and only float fields."""
    from rtsmap.models.train import load_train_config

    path = tmp_path / "train.yaml"
    path.write_text("data: x\nout: y\nlr: 1e-4\nfusion_lr: 5E-5\nnoise_std: {optical: 2e-2}\n")
    tc = load_train_config(path)
    assert tc.lr == 1e-4 and isinstance(tc.lr, float) and tc.fusion_lr == 5e-5 and tc.noise_std == {"optical": 0.02}
    path.write_text("data: x\nout: y\nbatch_size: 1e1\n")  # an integer field: no coercion
    with pytest.raises(ConfigError, match="batch_size: expected an integer >= 1, got '1e1'"):
        load_train_config(path)
    path.write_text("data: x\nout: y\nlr: .nan\n")
    with pytest.raises(ConfigError, match="lr: expected a finite number"):
        load_train_config(path)
    run = tmp_path / "run.yaml"
    run.write_text("cluster: {timeout_s: 1e1}\ninference: {min_area_m2: 150}\n")
    config = load_run_config(run)
    assert config.cluster.timeout_s == 10.0 and config.inference.min_area_m2 == 150.0


def test_flag_errors_name_no_file(tmp_path):
    """A bad flag value is not blamed on the configuration file."""
    path = tmp_path / "run.yaml"
    path.write_text("years: 2021\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path, {"inference.batch_size": 0})
    assert str(err.value) == "inference.batch_size: must be >= 1, got 0"
    with pytest.raises(ConfigError, match=r"^years: 1850 is outside 1950-2100$"):
        load_run_config(path, {"years": "1850"})
    assert load_run_config(path, {"years": "2019-2020"}).years == (2019, 2020)


def test_one_config_error_class():
    """pipeline.errors.ConfigError is the root class (the CLI's exit 2), and a ValueError."""
    assert pipeline_errors.ConfigError is ConfigError
    assert issubclass(ConfigError, pipeline_errors.RtsmapError) and issubclass(ConfigError, ValueError)


def test_model_config_from_dict_is_strict():
    from rtsmap.models.config import MODEL_VARIANTS, ModelConfig

    good = json.loads(json.dumps(MODEL_VARIANTS["demo"].to_dict()))
    assert ModelConfig.from_dict(good) == MODEL_VARIANTS["demo"]
    for key, value, expected in [
        ("tile_size", True, "ModelConfig.tile_size: expected an integer, got true"),
        ("tile_size", "256", "ModelConfig.tile_size: expected an integer, got '256'"),
        ("bogus", 1, "unknown key 'ModelConfig.bogus'"),
        ("aspect_ratios", "wide", "ModelConfig.aspect_ratios: expected a list, got 'wide'"),
        ("tile_size", 100, "ModelConfig.tile_size: must be a positive multiple of 64"),
    ]:
        with pytest.raises(ConfigError) as err:
            ModelConfig.from_dict({**good, key: value})
        assert expected in str(err.value) and "\n" not in str(err.value)


def test_shipped_files_read():
    root = Path(__file__).resolve().parents[1] / "workflows"
    for path in (root / "profiles").glob("*.yaml"):
        assert isinstance(load_profile(path), CatalogProfile)
    from rtsmap.models.train import load_train_config

    for path in (root / "train_configs").glob("*.yaml"):
        assert load_train_config(path).lr > 0


# --- property tests: random input never escapes as anything but ConfigError ---------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True), st.text(max_size=12),
    st.sampled_from(["1e-4", "2021-2023", "cpu", "cuda", "local", "slurm", "address", "nan", "-1"]),
)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_run_keys = st.sampled_from(["years", "out", "retries", "grid", "inference", "cluster", "overwrite", "bogus"])
_sub_keys = st.sampled_from(
    ["batch_size", "providers", "min_area_m2", "kind", "address", "jobs", "timeout_s", "overlap_px", "crs", "x"]
)
_run_dicts = st.dictionaries(
    _run_keys, st.one_of(_values, st.dictionaries(_sub_keys, _values, max_size=4)), max_size=5
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_run_dicts)
def test_run_config_reader_never_raises_anything_else(data):
    try:
        config = validate(RunConfig, data, "run.yaml")
    except ConfigError as exc:
        text = str(exc)
        assert text.startswith("run.yaml: ") and "\n" not in text
        return
    assert isinstance(config, RunConfig)
    assert config.inference.batch_size >= 1 and config.years == tuple(sorted(set(config.years)))
    assert all(1950 <= y <= 2100 for y in config.years)


_train_keys = st.sampled_from(
    ["data", "out", "lr", "batch_size", "seed", "modalities", "fusion", "noise_std", "model_overrides",
     "min_lr_ratio", "device", "flips", "model", "bogus"]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_train_keys, _values, max_size=6))
def test_train_config_reader_never_raises_anything_else(data):
    from rtsmap.models.train import TrainConfig

    try:
        tc = validate(TrainConfig, data, "train.yaml")
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert tc.lr > 0 and tc.batch_size >= 1 and 0 <= tc.min_lr_ratio <= 1


_yaml_text = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(["name: x", "modalities:", "  dem:", "    bands: [", "{", "- a", ": b", "&a x", "*a",
                              "!!python/object:os.system", "  collections: [c]", "\t", "'", "1e-4"]),
             max_size=6).map("\n".join),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_yaml_text)
def test_yaml_files_give_a_profile_or_one_line(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        profile = load_profile(path)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    assert isinstance(profile, CatalogProfile) and profile.modalities


def test_read_yaml_refuses_python_tags_and_bad_bytes(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="is not valid YAML at line 1"):
        read_yaml(path, "configuration file")
    path.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        read_yaml(path, "configuration file")
    path.write_text("[" * 5000)
    with pytest.raises(ConfigError, match="x.yaml: "):
        read_yaml(path, "configuration file")
