"""Shared fixtures: a small synthetic demo region and the ARTS sample and schema (when present)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# onnxruntime's optimized graphs (pipeline/graph_cache.py) go to a folder of this test session, not
# the user's cache; set before any test starts a process, so Dask workers and CLI runs inherit it.
os.environ["RTSMAP_CACHE_DIR"] = tempfile.mkdtemp(prefix="rtsmap-test-cache-")
atexit.register(shutil.rmtree, os.environ["RTSMAP_CACHE_DIR"], True)

# The ARTS files live in ../shared beside the checkout (not in the repository), found relative to
# this file so that the tests that need them run on any machine that has them.
ARTS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "arts"
ARTS_SAMPLE = ARTS_DIR / "ARTS_main_dataset_v.0.0.7-alpha.geojson"
ARTS_SCHEMA = ARTS_DIR / "Metadata_Format_Summary.csv"



@pytest.fixture(scope="session")
def demo_region(tmp_path_factory):
    """A 2.5 km x 2.5 km demo region, 2021-2023, seed 0, realistic SAR (docs/synthetic-sar.md),
    as the shipped demo model was trained on (generated once per session, a few seconds)."""
    from rtsmap.workflows.demo_region import generate_region

    return generate_region(tmp_path_factory.mktemp("demo_region"), seed=0, years=(2021, 2022, 2023), size_m=(2500.0, 2500.0),
                           sar="realistic")


@pytest.fixture(scope="session")
def demo_plan(demo_region, tmp_path_factory):
    """A function ``years -> RunPlan``: the demo region planned with the demo model in chunks of
    2 x 2 tiles, for one worker of one thread (what the task tests run)."""
    from rtsmap.workflows.config import DEMO_MODEL, ClusterConfig, GridConfig, InferenceConfig, RunConfig
    from rtsmap.workflows.run import make_plan

    def plan(years: tuple[int, ...]):
        out = tmp_path_factory.mktemp("plan") / "inv.gpkg"
        return make_plan(RunConfig(aoi=str(demo_region.aoi), years=years, catalog=str(demo_region.items),
                                   profile="demo", model=str(DEMO_MODEL), out=str(out),
                                   grid=GridConfig(tiles_per_chunk=2),
                                   inference=InferenceConfig(batch_size=4, threads=1),
                                   cluster=ClusterConfig(n_workers=1)))

    return plan


@pytest.fixture(scope="session")
def legacy_region(tmp_path_factory):
    """The same region with the first generator's SAR (``legacy``: far too easy)."""
    from rtsmap.workflows.demo_region import generate_region

    return generate_region(tmp_path_factory.mktemp("legacy_region"), seed=0, years=(2021, 2022, 2023),
                           size_m=(2500.0, 2500.0), sar="legacy")


@pytest.fixture(scope="session")
def v1_model() -> Path:
    """The first shipped demo model (format 1: no presence input, every modality needed), kept so
    that reading format 1 files and their no_data rule stay tested; the same bytes are in the
    repository's history, so the copy costs git nothing."""
    return Path(__file__).resolve().parent / "data" / "demo_model_v1.onnx"


@pytest.fixture(scope="session")
def arts_path() -> Path:
    """The ARTS sample GeoJSON in ../shared (skips the test where the checkout has none)."""
    if not ARTS_SAMPLE.exists():
        pytest.skip(f"ARTS sample not found at {ARTS_SAMPLE}")
    return ARTS_SAMPLE


@pytest.fixture(scope="session")
def arts_schema_path() -> Path:
    """The ARTS metadata schema CSV in ../shared (skips the test where the checkout has none)."""
    if not ARTS_SCHEMA.exists():
        pytest.skip(f"ARTS schema not found at {ARTS_SCHEMA}")
    return ARTS_SCHEMA


@pytest.fixture(scope="session")
def validate_gpkg():
    """A function that asserts a GeoPackage passes GDAL's current validator (gdal-utils'
    ``validate_gpkg.py``, installed by ``make install``; Debian's GDAL 3.6 one predates the rtree
    triggers GDAL 3.12 writes)."""
    import subprocess
    import sys

    try:
        import osgeo_utils.samples.validate_gpkg  # noqa: F401
    except ImportError:
        pytest.skip("gdal-utils is not installed (make install adds it)")

    def check(path) -> None:
        proc = subprocess.run([sys.executable, "-m", "osgeo_utils.samples.validate_gpkg", str(path)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and not proc.stdout.strip(), (proc.stdout + proc.stderr)[-2000:]

    return check
