"""Run configuration: file + flags, and bad configuration ends in one clear line."""

import subprocess
import sys
from pathlib import Path

import pytest

from rtsmap.pipeline.errors import ConfigError
from rtsmap.workflows.config import load_run_config, parse_years

RTSMAP = [sys.executable, "-m", "rtsmap.workflows.cli"]


def test_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "years: 2019-2020\n"
        "out: a.gpkg\n"
        "inference: {batch_size: 4, providers: [cuda, cpu]}\n"
        "cluster: {kind: slurm, jobs: 3, gpus_per_worker: 1, lifetime: 55m}\n"
    )
    config = load_run_config(path, {"out": "b.gpkg", "cluster.jobs": 5, "retries": None})
    assert config.years == (2019, 2020)
    assert config.out == "b.gpkg"  # the flag wins over the file
    assert config.cluster.jobs == 5 and config.cluster.kind == "slurm" and config.cluster.lifetime == "55m"
    assert config.inference.providers == ("cuda", "cpu") and config.inference.batch_size == 4
    assert config.retries == 2  # a flag that was not given leaves the default
    assert config.work_dir == Path("b.gpkg.work")


@pytest.mark.parametrize(
    "text, message",
    [
        ("cluster: {kindd: local}\n", "unknown key 'cluster.kindd'"),
        ("inference: {batch_size: two}\n", "inference.batch_size: expected an integer"),
        ("overwrite: yes please\n", "overwrite: expected true or false"),
        ("cluster: {kind: yarn}\n", "cluster.kind: expected one of 'local', 'address', 'slurm', 'pbs', 'kubernetes', got 'yarn'"),
        ("cluster: {kind: address}\n", "cluster.address is not set"),
        ("inference: {providers: [rocm]}\n", "inference.providers[0]: expected one of 'tensorrt', 'cuda', 'cpu', got 'rocm'"),
        ("years: 2023-2021\n", "years: the range '2023-2021' runs backwards"),
        ("- a\n- b\n", "must be a mapping"),
        ("a: [\n", "is not valid YAML"),
    ],
)
def test_bad_configuration(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_run_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config("/nonexistent/run.yaml")


def test_parse_years():
    assert parse_years("2021-2023") == (2021, 2022, 2023)
    assert parse_years("2023,2021") == (2021, 2023)
    for bad in ("", "twenty", "1800", "2021-"):
        with pytest.raises(ConfigError):
            parse_years(bad)


def test_cli_bad_config_is_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("cluster: {workers: 3}\n")
    proc = subprocess.run(
        RTSMAP + ["run", "--aoi", "x.geojson", "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith(f"error: {path}: unknown key 'cluster.workers'")
    assert "Traceback" not in proc.stderr


def test_cli_unreachable_scheduler(tmp_path):
    """A scheduler address nothing listens on: one line, exit 2."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from rtsmap.workflows.cluster import open_cluster
    from rtsmap.workflows.config import ClusterConfig

    with pytest.raises(ConfigError, match="cannot reach the Dask scheduler"):
        with open_cluster(ClusterConfig(kind="address", address=f"tcp://127.0.0.1:{port}", timeout_s=2)):
            pass


def test_cli_catalog_down_is_one_line(tmp_path):
    """A catalog nothing answers: retries (quietly), then one line and exit 2."""
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    aoi = tmp_path / "aoi.geojson"
    ring = [[-135.3, 67.4], [-135.2, 67.4], [-135.2, 67.45], [-135.3, 67.45], [-135.3, 67.4]]
    aoi.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    proc = subprocess.run(
        RTSMAP + ["plan", "--aoi", str(aoi), "--years", "2021", "--catalog", f"http://127.0.0.1:{port}/stac",
                  "--profile", "demo"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith(f"error: catalog http://127.0.0.1:{port}/stac is unreachable")


def test_kubernetes_workers_ask_for_gpus_and_advertise_them():
    """Kubernetes honours cluster.gpus_per_worker as SLURM/PBS do (no cluster here: the KubeCluster
    arguments are checked, not a running operator)."""
    from rtsmap.workflows.cluster import kubernetes_options
    from rtsmap.workflows.config import ClusterConfig

    assert kubernetes_options(ClusterConfig(kind="kubernetes")) == {}
    options = kubernetes_options(ClusterConfig(kind="kubernetes", gpus_per_worker=1, tasks_per_gpu=2))
    assert options["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    command = options["worker_command"]
    assert command[command.index("--resources") + 1] == "GPU=1"
    assert command[command.index("--nthreads") + 1] == "2"
