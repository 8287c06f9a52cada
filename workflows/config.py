"""Run configuration: a YAML file for what users change often, command-line flags on top.

The file mirrors :class:`RunConfig` and is read by the strict reader of
:mod:`rtsmap.config_schema`: unknown keys, wrong types and out-of-range values are refused in one
line naming the file and the key's dotted name, so a typo never silently falls back to a default
on a multi-day run::

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
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at
from pydantic import BeforeValidator

from rtsmap.config_schema import (
    Bool,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Str,
    read_yaml,
    schema,
    validate,
)
from rtsmap.pipeline.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_MODEL = PACKAGE_DIR / "assets" / "demo_model.onnx"

# --- years: one parser for the --years flags and the configuration files --------------------------

YEAR_MIN, YEAR_MAX = 1950, 2100
"""Years outside this range are refused everywhere (a typo such as 1850 or 20211 is not a year)."""

_YEAR_PART = re.compile(r"\s*([0-9]{4})\s*(?:-\s*([0-9]{4})\s*)?", re.ASCII)


def _years(value: Any) -> tuple[int, ...]:
    """The years in ``value``; raises ``ValueError`` with a message that names no key."""
    years: set[int] = set()
    if isinstance(value, str):
        for part in value.split(","):
            match = _YEAR_PART.fullmatch(part)
            if not match:
                raise ValueError(
                    f"cannot read {value!r}; write a year (2021), a range (2019-2021) or a list (2019,2021)"
                )
            start = int(match.group(1))
            end = int(match.group(2) or start)
            if end < start:
                raise ValueError(f"the range {part.strip()!r} runs backwards; write {end}-{start}")
            years.update(range(start, end + 1))
    elif isinstance(value, int) and not isinstance(value, bool):
        years.add(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, (list, tuple)):
                raise ValueError(f"expected a year or a range in the list, got a list: {_short(item)}")
            years.update(_years(item))
    else:
        raise ValueError(f"expected a year (2021), a range ('2019-2021') or a list of years, got {_short(value)}")
    if not years:
        raise ValueError("no year given")
    bad = [y for y in sorted(years) if not YEAR_MIN <= y <= YEAR_MAX]
    if bad:
        raise ValueError(f"{bad[0]} is outside {YEAR_MIN}-{YEAR_MAX}")
    return tuple(sorted(years))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_years(value: str | int | list | tuple, name: str = "years") -> tuple[int, ...]:
    """Read years as the ``--years`` flags and the ``years`` key of a configuration give them.

    Parameters
    ----------
    value
        ``"2021"``, a range ``"2019-2021"``, a list ``"2019,2021"`` (parts may be ranges), an
        integer, or a list of integers or such strings (YAML ``[2019, 2021]``).
    name
        The flag or key named in the message (``years``, ``--years``).

    Returns
    -------
    tuple of int
        Sorted, without duplicates, each within YEAR_MIN..YEAR_MAX.

    Raises
    ------
    ConfigError
        For anything else, in one line naming ``name``.
    """
    try:
        return _years(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


Years = Annotated[tuple[int, ...], BeforeValidator(_years)]
"""A ``years`` field: whatever :func:`parse_years` reads (its message gets the key's path)."""

Provider = Literal["tensorrt", "cuda", "cpu"]
"""onnxruntime execution providers rtsmap knows."""

ClusterKind = Literal["local", "address", "slurm", "pbs", "kubernetes"]
"""Where Dask workers come from."""

WorkerStart = Literal["auto", "fork", "spawn"]
"""How a local cluster starts its worker processes (``ClusterConfig.worker_start``)."""



@schema
@dataclass(frozen=True)
class GridConfig:
    """How chunks and tiles are laid out (tile size and resolution come from the model)."""

    crs: Str = "EPSG:3413"
    """CRS of the processing grid and of the inventory."""
    overlap_px: NonNegativeInt = 32
    """Pixels shared by neighbouring tiles, so slumps on a seam are seen whole by one tile."""
    tiles_per_chunk: PositiveInt = 8
    """Tiles along each side of a chunk (a chunk is the unit of I/O and of one task)."""


@schema
@dataclass(frozen=True)
class InferenceConfig:
    """How the ONNX model runs on a worker."""

    providers: Annotated[tuple[Provider, ...], at.MinLen(1)] = ("cpu",)
    """Execution providers in order of preference: tensorrt, cuda, cpu."""
    require_gpu: Bool = True
    """When a GPU provider was asked for and is not in use: fail (True) or warn (False)."""
    batch_size: PositiveInt = 8
    """Tiles per model call."""
    threads: NonNegativeInt = 0
    """onnxruntime intra-op threads per worker process (0: onnxruntime's default)."""
    min_area_m2: NonNegativeFloat = 200.0
    """Polygons smaller than this are dropped (a 10 m pixel is 100 m2)."""


@schema
@dataclass(frozen=True)
class ClusterConfig:
    """Where the Dask workers come from."""

    kind: ClusterKind = "local"
    """local (a LocalCluster on this machine), address (an existing scheduler), slurm, pbs, kubernetes."""
    address: Str | None = None
    """Scheduler address for kind=address, e.g. tcp://10.0.0.5:8786."""
    n_workers: NonNegativeInt = 0
    """Worker processes for kind=local (0: one per core, at most 4)."""
    threads_per_worker: PositiveInt = 1
    """Threads per worker process: each thread runs one task (a GPU worker runs ``tasks_per_gpu`` at once)."""
    memory_limit: Str = "auto"
    """Memory limit per local worker (Dask syntax, e.g. 4GiB)."""
    worker_start: WorkerStart = "auto"
    """How a local cluster starts its worker processes: ``fork`` (a copy of this process, whose
    task code is imported already: ~0.1 s a worker instead of ~1.5 s), ``spawn`` (a fresh
    interpreter, Dask's default), ``auto`` (fork on Linux without GPUs, else spawn). Workers
    that Dask restarts later are always spawned."""
    jobs: PositiveInt = 1
    """Batch jobs to start for kind=slurm/pbs (each runs the workers that Dask's jobqueue config asks for)."""
    gpus_per_worker: NonNegativeInt = 0
    """GPUs each worker advertises as the Dask resource GPU; inference tasks ask for one when > 0."""
    tasks_per_gpu: PositiveInt = 2
    """Tasks sharing one GPU (each asks for 1/tasks_per_gpu of it), so that one task loads its
    chunk while another runs the model; give workers at least this many threads."""
    lifetime: Str | None = None
    """Retire workers before the batch walltime, e.g. 55m for a 1-hour job (Dask's --lifetime)."""
    timeout_s: PositiveFloat = 30.0
    """Seconds to wait for a scheduler or the first worker before giving up."""


@schema
@dataclass(frozen=True)
class RunConfig:
    """Everything one `rtsmap run` needs, after the file and the flags are merged."""

    aoi: Str | None = None
    """Vector file with the area of interest."""
    years: Years = (2021, 2022, 2023)
    """Years to map, one inventory layer each."""
    catalog: Str | None = None
    """STAC API URL or local catalog path; None takes the profile's URL."""
    profile: Str | None = None
    """Modality profile: a shipped name (demo, earth-search, planetary-computer) or a YAML path;
    None: chosen by the rule of ``workflows.planning`` (the catalog's URL or collections)."""
    model: Str = str(DEMO_MODEL)
    """Exported ONNX model (its metadata sets bands, tile size and resolution)."""
    out: Str = "rts_inventory.gpkg"
    """Output GeoPackage."""
    workdir: Str | None = None
    """Where fragments of finished chunk-years are kept; default: <out>.work next to the output."""
    overwrite: Bool = False
    """Replace an existing output GeoPackage."""
    retries: NonNegativeInt = 2
    """How often a failed chunk-year is tried again before it is recorded as failed."""
    max_in_flight: NonNegativeInt = 0
    """Tasks submitted at once (0: 4 per worker); the rest wait, so the scheduler never holds a huge graph."""
    truth: Str | None = None
    """Optional reference inventory to report precision/recall/F1 against at the end."""
    quicklook: Bool = True
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
        One line naming the file (or none, for a bad flag value) and the key: a missing,
        unreadable, empty or non-mapping file, invalid YAML, unknown keys, wrong types or values
        out of range.
    """
    data: dict[str, Any] = read_yaml(path, "configuration file") if path is not None else {}
    given = {dotted: value for dotted, value in (overrides or {}).items() if value is not None}
    for dotted, value in given.items():
        target = data
        *parents, leaf = dotted.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                where = f"{path}: " if path is not None else ""
                raise ConfigError(f"{where}{parent}: expected a mapping, got {_short(target)}")
        target[leaf] = value
    config = validate(RunConfig, data, str(path) if path is not None else None, from_elsewhere=set(given))
    if config.cluster.kind == "address" and not config.cluster.address:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}cluster.kind is address but cluster.address is not set")
    return config


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
