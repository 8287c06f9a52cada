"""Run configuration: a YAML file for what users change often, command-line flags on top.

The file mirrors :class:`RunConfig`; unknown keys and wrong types are refused with the key's
dotted name, so a typo never silently falls back to a default on a multi-day run::

    years: [2021, 2022, 2023]
    catalog: https://planetarycomputer.microsoft.com/api/stac/v1
    profile: planetary-computer
    model: models/rts.onnx
    grid: {overlap_px: 32, tiles_per_chunk: 8}
    inference: {providers: [cuda, cpu], batch_size: 16}
    cluster: {kind: slurm, jobs: 20}
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from rtsmap.pipeline.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_MODEL = PACKAGE_DIR / "assets" / "demo_model.onnx"


@dataclass(frozen=True)
class GridConfig:
    """How chunks and tiles are laid out (tile size and resolution come from the model)."""

    crs: str = "EPSG:3413"
    """CRS of the processing grid and of the inventory."""
    overlap_px: int = 32
    """Pixels shared by neighbouring tiles, so slumps on a seam are seen whole by one tile."""
    tiles_per_chunk: int = 8
    """Tiles along each side of a chunk (a chunk is the unit of I/O and of one task)."""


@dataclass(frozen=True)
class InferenceConfig:
    """How the ONNX model runs on a worker."""

    providers: tuple[str, ...] = ("cpu",)
    """Execution providers in order of preference: tensorrt, cuda, cpu."""
    require_gpu: bool = True
    """When a GPU provider was asked for and is not in use: fail (True) or warn (False)."""
    batch_size: int = 8
    """Tiles per model call."""
    threads: int = 0
    """onnxruntime intra-op threads per worker process (0: onnxruntime's default)."""
    min_area_m2: float = 200.0
    """Polygons smaller than this are dropped (a 10 m pixel is 100 m2)."""


@dataclass(frozen=True)
class ClusterConfig:
    """Where the Dask workers come from."""

    kind: str = "local"
    """local (a LocalCluster on this machine), address (an existing scheduler), slurm, pbs, kubernetes."""
    address: str | None = None
    """Scheduler address for kind=address, e.g. tcp://10.0.0.5:8786."""
    n_workers: int = 0
    """Worker processes for kind=local (0: one per core, at most 4)."""
    threads_per_worker: int = 1
    """Threads per worker process (inference is one task at a time per worker)."""
    memory_limit: str = "auto"
    """Memory limit per local worker (Dask syntax, e.g. 4GiB)."""
    jobs: int = 1
    """Batch jobs to start for kind=slurm/pbs (each runs the workers that Dask's jobqueue config asks for)."""
    gpus_per_worker: int = 0
    """GPUs each worker advertises as the Dask resource GPU; inference tasks ask for one when > 0."""
    tasks_per_gpu: int = 2
    """Tasks sharing one GPU (each asks for 1/tasks_per_gpu of it), so that one task loads its
    chunk while another runs the model; give workers at least this many threads."""
    lifetime: str | None = None
    """Retire workers before the batch walltime, e.g. 55m for a 1-hour job (Dask's --lifetime)."""
    timeout_s: float = 30.0
    """Seconds to wait for a scheduler or the first worker before giving up."""


@dataclass(frozen=True)
class RunConfig:
    """Everything one `rtsmap run` needs, after the file and the flags are merged."""

    aoi: str | None = None
    """Vector file with the area of interest."""
    years: tuple[int, ...] = (2021, 2022, 2023)
    """Years to map, one inventory layer each."""
    catalog: str | None = None
    """STAC API URL or local catalog path; None takes the profile's URL."""
    profile: str = "planetary-computer"
    """Modality profile: a shipped name (demo, earth-search, planetary-computer) or a YAML path."""
    model: str = str(DEMO_MODEL)
    """Exported ONNX model (its metadata sets bands, tile size and resolution)."""
    out: str = "rts_inventory.gpkg"
    """Output GeoPackage."""
    workdir: str | None = None
    """Where fragments of finished chunk-years are kept; default: <out>.work next to the output."""
    overwrite: bool = False
    """Replace an existing output GeoPackage."""
    retries: int = 2
    """How often a failed chunk-year is tried again before it is recorded as failed."""
    max_in_flight: int = 0
    """Tasks submitted at once (0: 4 per worker); the rest wait, so the scheduler never holds a huge graph."""
    truth: str | None = None
    """Optional reference inventory to report precision/recall/F1 against at the end."""
    quicklook: bool = True
    """Write a PNG map per year next to the GeoPackage."""
    grid: GridConfig = field(default_factory=GridConfig)
    """Grid layout."""
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    """Model execution."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Dask cluster."""

    @property
    def work_dir(self) -> Path:
        """The fragment directory, derived from the output path when not set."""
        return Path(self.workdir) if self.workdir else Path(str(self.out) + ".work")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a simple type annotation; convert lists to tuples."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is tuple:
        if isinstance(value, (str, int)) and args[0] is int and key.endswith("years"):
            value = parse_years(str(value))
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(annotation, value, key + ".")
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {annotation!r}")  # pragma: no cover - programming error


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(known))})")
    values = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**values)


def parse_years(text: str) -> tuple[int, ...]:
    """Parse ``2021-2023`` or ``2021,2023`` into a sorted tuple of years.

    Raises
    ------
    ConfigError
        When the text is not a year, a range or a comma-separated list of years.
    """
    years: set[int] = set()
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part:
                start, end = (int(p) for p in part.split("-", 1))
                if end < start:
                    raise ValueError
                years.update(range(start, end + 1))
            else:
                years.add(int(part))
    except ValueError:
        raise ConfigError(f"years: cannot read {text!r}; write e.g. 2021-2023 or 2021,2023") from None
    if not years or min(years) < 1950 or max(years) > 2100:
        raise ConfigError(f"years: {text!r} is outside 1950-2100")
    return tuple(sorted(years))


def load_run_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a run configuration file and apply command-line overrides.

    Parameters
    ----------
    path
        YAML file, or None for the defaults.
    overrides
        Dotted keys (``cluster.kind``) to values; None values are ignored (flag not given).

    Returns
    -------
    RunConfig

    Raises
    ------
    ConfigError
        For a missing or unparsable file, unknown keys or wrong types.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"configuration file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration file {path} is not valid YAML: {exc}".splitlines()[0]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {path} must be a mapping of keys to values")
        data = loaded or {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        target = data
        *parents, leaf = dotted.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{parent}: expected a mapping")
        target[leaf] = value
    try:
        config = _build(RunConfig, data)
    except ConfigError as exc:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"{exc}{where}") from None
    _check_values(config)
    return config


def _check_values(config: RunConfig) -> None:
    if config.cluster.kind not in {"local", "address", "slurm", "pbs", "kubernetes"}:
        raise ConfigError(f"cluster.kind: {config.cluster.kind!r} is not one of local, address, slurm, pbs, kubernetes")
    if config.cluster.kind == "address" and not config.cluster.address:
        raise ConfigError("cluster.kind is address but cluster.address is not set")
    for name in config.inference.providers:
        if name not in {"cpu", "cuda", "tensorrt"}:
            raise ConfigError(f"inference.providers: {name!r} is not one of tensorrt, cuda, cpu")
    if config.inference.batch_size < 1:
        raise ConfigError("inference.batch_size must be at least 1")
    if config.cluster.tasks_per_gpu < 1:
        raise ConfigError("cluster.tasks_per_gpu must be at least 1")
    if config.retries < 0:
        raise ConfigError("retries must be 0 or more")


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """A JSON-safe dictionary of the configuration (for run metadata)."""
    return dataclasses.asdict(config)


__all__ = [
    "ClusterConfig",
    "GridConfig",
    "InferenceConfig",
    "RunConfig",
    "config_to_dict",
    "load_run_config",
    "parse_years",
    "replace",
]
