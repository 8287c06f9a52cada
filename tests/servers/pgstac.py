"""A real STAC API on 127.0.0.1 as Planetary Computer runs it: stac-fastapi-pgstac on PostgreSQL + PostGIS.

Started from scratch for each use, with nothing left behind:

1. ``initdb`` a throwaway cluster in a new folder under the system temporary folder (PostgreSQL
   refuses to run as root: as root, the cluster and the server belong to the ``postgres`` user,
   and the folder is made for it, since pytest's own temporary folders are private to root);
2. ``postgres`` in the foreground on a free 127.0.0.1 port, its unix socket in that folder,
   with durability off (``fsync``, ``synchronous_commit``, ``full_page_writes``: a test database
   never survives a crash anyway);
3. ``CREATE EXTENSION postgis``, ``pypgstac migrate`` (the pgstac schema), ``pypgstac load`` of
   the given collections and items;
4. ``uvicorn stac_fastapi.pgstac.app:create_app --factory`` on another free port, configured by
   the ``PG*`` variables that stac-fastapi-pgstac's ``PostgresSettings`` reads, polled on ``/``.

Local connections are trusted (``initdb --auth=trust``) and only 127.0.0.1 and the private
socket listen, so no password exists; stac-fastapi-pgstac requires ``PGPASSWORD`` to be set and
gets a placeholder it never needs.

stac-fastapi-pgstac, pypgstac and uvicorn live in ``.venv-servers`` (``make servers``); PostgreSQL
and PostGIS are Debian's (``apt-get install postgresql postgresql-postgis``; ``.ci/run`` does).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers.common import free_port, stop, wait_until

REPO = Path(__file__).resolve().parents[2]
# The OS user that owns the cluster when the tests run as root (Debian's postgresql package makes it).
PG_OS_USER = "postgres"
PG_DB_USER = "postgres"
PG_DB = "postgres"


@dataclass(frozen=True)
class PgstacApi:
    """A running stac-fastapi-pgstac and its database."""

    url: str
    """The API root, ``http://127.0.0.1:PORT``."""
    dsn: str
    """``postgresql://postgres@127.0.0.1:PORT/postgres`` (trust authentication, no password)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds each start-up step took: initdb, postgres, postgis, migrate, load, api, total."""


def servers_bin(name: str) -> str | None:
    """An executable of the servers venv: ``$RTSMAP_SERVERS_VENV``, the repository's ``.venv-servers``."""
    venv = os.environ.get("RTSMAP_SERVERS_VENV")
    for root in ([Path(venv)] if venv else []) + [REPO / ".venv-servers"]:
        exe = root / "bin" / name
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    return None


def postgres_bindir() -> Path | None:
    """Debian's ``/usr/lib/postgresql/<newest>/bin``, else the folder of ``postgres`` on PATH."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if debian:
        return debian[-1].parent
    found = shutil.which("postgres")
    return Path(found).resolve().parent if found else None


def _postgis_installed(bindir: Path) -> bool:
    pg_config = bindir / "pg_config"
    if pg_config.is_file():
        share = subprocess.run([str(pg_config), "--sharedir"], capture_output=True, text=True).stdout.strip()
        return (Path(share) / "extension" / "postgis.control").is_file()
    return any(Path("/usr/share/postgresql").glob("*/extension/postgis.control"))


def _run_as() -> dict:
    """``Popen`` keywords that run a command as the cluster's owner: ``postgres`` under root, else ourselves."""
    if os.geteuid() != 0:
        return {}
    import pwd

    owner = pwd.getpwnam(PG_OS_USER)
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}


def _cluster_parent() -> str:
    """Where the cluster's folder goes: the temporary folder, or /tmp where ``postgres`` could not reach it."""
    base = Path(tempfile.gettempdir()).resolve()
    if os.geteuid() == 0 and not all(p.stat().st_mode & 0o001 for p in [base, *base.parents]):
        return "/tmp"  # e.g. TMPDIR inside root's private folders: postgres must traverse every parent
    return str(base)


def why_not() -> str | None:
    """Why the API cannot be started here (the skip reason), or None when it can."""
    bindir = postgres_bindir()
    if bindir is None:
        return "PostgreSQL is not installed (apt-get install postgresql postgresql-postgis; .ci/run does)"
    if not _postgis_installed(bindir):
        return f"PostGIS is not installed for {bindir.parent.name} (apt-get install postgresql-postgis; .ci/run does)"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam(PG_OS_USER)
        except KeyError:
            return f"running as root and there is no {PG_OS_USER!r} user to run PostgreSQL as"
    for name in ("pypgstac", "uvicorn"):
        if servers_bin(name) is None:
            return f"{name} is not installed (make servers: .venv-servers with stac-fastapi-pgstac, pypgstac, uvicorn)"
    return None


def _check(cmd: list[str], what: str, **kwargs) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")


def _start(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """Start a server with its output in ``log`` (a pipe nobody reads could fill and stall it)."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)


def _wait(ready, proc: subprocess.Popen, what: str, log: Path, timeout: float) -> None:
    """:func:`wait_until`, with the end of the server's log in the error."""
    try:
        wait_until(ready, proc, what, timeout)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}: {log.read_text(errors='replace')[-2000:]}") from None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def pgstac_api(collections: Sequence[Path], items: Sequence[Path], *, timeout: float = 30.0) -> Iterator[PgstacApi]:
    """Run PostgreSQL + pgstac + stac-fastapi-pgstac with ``collections`` and ``items`` loaded.

    Parameters
    ----------
    collections
        Collection JSON files.
    items
        Item files pypgstac reads (NDJSON, one item per line).
    timeout
        Seconds each server may take to get ready.

    Yields
    ------
    PgstacApi

    Raises
    ------
    RuntimeError
        If a step fails or a server does not get ready in time (call :func:`why_not` first: it
        tells what is not installed).
    """
    reason = why_not()
    if reason is not None:
        raise RuntimeError(reason)
    bindir = postgres_bindir()
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    def lap(step: str, since: float) -> float:
        now = time.monotonic()
        timings[step] = round(now - since, 2)
        return now

    tmp = Path(tempfile.mkdtemp(prefix="rtsmap-pgstac-", dir=_cluster_parent()))
    procs: list[subprocess.Popen] = []
    try:
        if os.geteuid() == 0:
            owner = _run_as()
            os.chown(tmp, owner["user"], owner["group"])
        data = tmp / "data"
        _check(
            [str(bindir / "initdb"), "-D", str(data), "-U", PG_DB_USER, "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
            "initdb", cwd=tmp, **_run_as(),
        )
        t = lap("initdb", t0)
        pg_port = free_port()
        settings = {
            "listen_addresses": "127.0.0.1", "unix_socket_directories": str(tmp),
            "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
            "max_connections": "40", "shared_buffers": "32MB",
        }
        cmd = [str(bindir / "postgres"), "-D", str(data), "-p", str(pg_port)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        postgres = _start(cmd, tmp / "postgres.log", cwd=tmp, **_run_as())
        procs.append(postgres)
        isready = [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(pg_port), "-U", PG_DB_USER, "-d", PG_DB]
        _wait(lambda: subprocess.run(isready).returncode == 0, postgres, "postgres", tmp / "postgres.log", timeout)
        t = lap("postgres", t)
        dsn = f"postgresql://{PG_DB_USER}@127.0.0.1:{pg_port}/{PG_DB}"
        _check([str(bindir / "psql"), "-X", dsn, "-v", "ON_ERROR_STOP=1", "-qc", "CREATE EXTENSION postgis"], "CREATE EXTENSION postgis")
        t = lap("postgis", t)
        pypgstac = servers_bin("pypgstac")
        _check([pypgstac, "migrate", "--dsn", dsn], "pypgstac migrate")
        t = lap("migrate", t)
        # One NDJSON file of all the collections: one loader process instead of one per file.
        merged = tmp / "collections.ndjson"
        merged.write_text("".join(json.dumps(json.loads(Path(p).read_text())) + "\n" for p in collections))
        _check([pypgstac, "load", "collections", str(merged), "--dsn", dsn, "--method", "insert"], "pypgstac load collections")
        for path in items:
            _check([pypgstac, "load", "items", str(path), "--dsn", dsn, "--method", "insert"], f"pypgstac load items {path.name}")
        t = lap("load", t)

        api_port = free_port()
        env = {
            **os.environ,
            # stac-fastapi-pgstac's PostgresSettings (pydantic-settings, case-insensitive names).
            "PGUSER": PG_DB_USER, "PGPASSWORD": "not-used-trust-auth", "PGHOST": "127.0.0.1",
            "PGPORT": str(pg_port), "PGDATABASE": PG_DB,
            "DB_MIN_CONN_SIZE": "1", "DB_MAX_CONN_SIZE": "4",
            "STAC_FASTAPI_TITLE": "rtsmap test pgstac", "STAC_FASTAPI_DESCRIPTION": "demo region",
            "STAC_FASTAPI_LANDING_ID": "rtsmap-test", "STAC_FASTAPI_VERSION": "test",
        }
        # cwd: the settings also read a `.env` file from the working folder; the empty one has none.
        api = _start(
            [servers_bin("uvicorn"), "stac_fastapi.pgstac.app:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(api_port), "--log-level", "warning"],
            tmp / "api.log", cwd=tmp, env=env,
        )
        procs.append(api)
        url = f"http://127.0.0.1:{api_port}"
        _wait(lambda: _answers(url), api, "stac-fastapi-pgstac", tmp / "api.log", timeout)
        t = lap("api", t)
        timings["total"] = round(time.monotonic() - t0, 2)
        yield PgstacApi(url, dsn, timings)
    finally:
        # The API first (it holds connections), then postgres (SIGTERM: smart shutdown, no clients left).
        for proc in reversed(procs):
            stop(proc, timeout=20)
        shutil.rmtree(tmp, ignore_errors=True)
