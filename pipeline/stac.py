"""Find scenes in a STAC catalog: a STAC API or a local file, with the same results either way.

``open_catalog`` takes a URL (a STAC API, searched with pystac-client, with retries and a
timeout) or a path (an ItemCollection JSON, NDJSON with one item per line, a static
``catalog.json``, or a stac-geoparquet file). ``Catalog.search`` applies the same spatial,
temporal and cloud filters to both, and returns items sorted by id.

Planetary Computer assets need a SAS token appended to their hrefs at read time:
``make_signer`` (in :mod:`rtsmap.pipeline.signing`, re-exported here) returns a function that
does it with Microsoft's ``planetary-computer`` package. Tokens and signed URLs never appear in logs or messages: every message that
contains a URL passes through ``redact``.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import re
import threading
import warnings
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pystac
import shapely
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from rtsmap.pipeline.errors import CatalogError, ConfigError
from rtsmap.pipeline.profiles import CatalogProfile, ModalityProfile
from rtsmap.pipeline.signing import PlanetaryComputerSigner, make_signer  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

RETRY_STATUS = (429, 500, 502, 503, 504)
SIGNING_SCHEMES = ("planetary-computer",)
"""Asset href signing schemes ``open_catalog`` accepts."""


# --- redaction ----------------------------------------------------------------------------------


def redact(url: str) -> str:
    """Strip what may hold a secret from a URL: the query string, the fragment and any user:password.

    Parameters
    ----------
    url
        A URL (or a path, returned unchanged).

    Returns
    -------
    str
        The URL without query string, fragment or credentials; ``?...`` marks a removed query.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<url>"
    if not parts.scheme or not parts.netloc:
        return url.split("?", 1)[0]
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:  # "host:8786:" at the end of a sentence; keep the host, drop what is not a port
        port = None
    if port:
        host = f"{host}:{port}"
    redacted = urlunsplit((parts.scheme, host, parts.path, "", ""))
    return redacted + ("?..." if parts.query else "")


# A URL in a sentence: trailing punctuation (":", ",", ".", ";") belongs to the sentence.
_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>)]*[^\s'\"<>):,.;]")
# SAS tokens have a recognisable shape; catch one even where it is not part of a URL.
_SAS_IN_TEXT = re.compile(r"(?:^|(?<=[\s?&'\"]))(?:sv|st|se|sp|sig|skoid|sktid|skt|ske|sks|skv|sr|spr|rscd)=[^\s&'\"]+")


def redact_text(text: str) -> str:
    """Apply :func:`redact` to every URL in a message, and drop stray SAS token fields."""
    text = _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)
    # urllib3 writes request paths without scheme and host ("/search?token=..."): cut their query too.
    text = re.sub(r"(/[^\s'\"?]*)\?[^\s'\")]+", r"\1?...", text)
    return _SAS_IN_TEXT.sub("<redacted>", text)


class _RedactFilter(logging.Filter):
    """Rewrites log records of the HTTP libraries so no query string or header value gets out.

    pystac-client logs each request with its URL and headers at DEBUG, and urllib3 logs the
    request path (with query) on each retry; either can carry a token.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to fix; drop its arguments
            message = str(record.msg)
        message = re.sub(r"Headers: \{.*?\}", "Headers: <redacted>", message)
        record.msg = redact_text(message)
        record.args = None
        return True


for _name in ("pystac_client.stac_api_io", "urllib3.connectionpool", "urllib3.util.retry"):
    logging.getLogger(_name).addFilter(_RedactFilter())


# --- time windows -------------------------------------------------------------------------------


def season_window(year: int, season: tuple[str, str]) -> tuple[dt.datetime, dt.datetime]:
    """The UTC datetime window of a month-day season in one year, both days whole.

    Parameters
    ----------
    year
        The year.
    season
        ``("MM-DD", "MM-DD")``, e.g. ``("07-01", "08-31")``.

    Returns
    -------
    tuple of datetime
        Start at 00:00:00 of the first day, end at 23:59:59.999999 of the last day (UTC).
    """
    start = dt.datetime.fromisoformat(f"{year}-{season[0]}T00:00:00+00:00")
    end = dt.datetime.fromisoformat(f"{year}-{season[1]}T23:59:59.999999+00:00")
    return start, end


def _utc(value: dt.datetime | str | None) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def _interval_text(start: dt.datetime | None, end: dt.datetime | None) -> str:
    def fmt(v: dt.datetime | None) -> str:
        return ".." if v is None else v.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    return f"{fmt(start)}/{fmt(end)}"


# --- the catalog --------------------------------------------------------------------------------


class Catalog:
    """A searchable source of STAC items (see :func:`open_catalog`)."""

    source: str
    """The catalog's URL (redacted) or path, for messages."""

    signing: str | None = None
    """Asset href signing scheme (None or ``planetary-computer``), applied at read time."""

    headers: dict[str, str] | None = None
    """Extra HTTP headers sent to the API (None for local catalogs)."""

    def sign(self, href: str, collection: str) -> str:
        """An asset href ready to read (with a SAS token where the catalog needs one; never log it).

        The signer is the process's shared one (:func:`shared_signer`), built on first use.
        """
        return shared_signer(self.signing)(href, collection)

    def for_modality(self, modality: str) -> Catalog:
        """The catalog a modality's items are searched in (this one; see :class:`ModalityCatalogs`)."""
        return self

    def collection_ids(self) -> list[str] | None:
        """Ids of the collections the catalog holds, sorted; None when they cannot be listed."""
        return None

    def search(
        self,
        collections: Sequence[str],
        intersects: BaseGeometry | dict | None = None,
        datetime: tuple[dt.datetime | str | None, dt.datetime | str | None] | None = None,
        cloud_property: str | None = None,
        max_cloud: float | None = None,
        page_size: int = 100,
    ) -> list[pystac.Item]:
        """Items of ``collections`` that intersect a WGS84 geometry, in a time window, not too cloudy.

        Parameters
        ----------
        collections
            Collection ids.
        intersects
            Shapely geometry in WGS84 (lon, lat) or a GeoJSON dict; None for no spatial filter.
        datetime
            ``(start, end)``, both inclusive, either may be None (open); None for no filter.
            Items with a ``start_datetime``/``end_datetime`` range match when the range overlaps.
        cloud_property, max_cloud
            Keep items whose ``cloud_property`` is at most ``max_cloud``; items without the
            property are left out when ``max_cloud`` is given.
        page_size
            Items per page asked from a STAC API.

        Returns
        -------
        list of pystac.Item
            Sorted by id.

        Raises
        ------
        CatalogError
            If the catalog cannot be reached or answers with an error.
        """
        raise NotImplementedError


def _as_geometry(intersects: BaseGeometry | dict | None) -> BaseGeometry | None:
    if intersects is None or isinstance(intersects, BaseGeometry):
        return intersects
    return shape(intersects)


def _cloud_ok(item: pystac.Item, cloud_property: str | None, max_cloud: float | None) -> bool:
    if max_cloud is None or cloud_property is None:
        return True
    value = item.properties.get(cloud_property)
    if value is None:
        return False
    return float(value) <= max_cloud


def _time_ok(item: pystac.Item, start: dt.datetime | None, end: dt.datetime | None) -> bool:
    """STAC API semantics: an item's range (start/end_datetime) overlapping the window, else its datetime."""
    props = item.properties
    lo = _utc(props.get("start_datetime"))
    hi = _utc(props.get("end_datetime"))
    if lo is None or hi is None:
        lo = hi = _utc(props.get("datetime"))
    if lo is None or hi is None:
        return False
    if start is not None and hi < start:
        return False
    if end is not None and lo > end:
        return False
    return True


class LocalCatalog(Catalog):
    """Items of a local file or static catalog.

    A stac-geoparquet file (or folder of them) and an NDJSON file are never read whole by
    :meth:`iter_dicts`: stac-geoparquet is searched with pyarrow pushdown
    (:mod:`rtsmap.pipeline.geoparquet`), NDJSON is streamed line by line. :attr:`items` (every
    item as a ``pystac.Item``, for :meth:`search`) is read on first use only.
    """

    def __init__(self, path: Path, items: list[pystac.Item] | None = None):
        self.path = Path(path)
        self.source = str(path)
        self._items = items
        self._geoms: list | None = None
        self._holdings: dict[str, frozenset[str]] | None = None

    @property
    def items(self) -> list[pystac.Item]:
        """Every item, read whole on first use (small catalogs and :meth:`search` only)."""
        if self._items is None:
            self._items = read_items(self.path)
        return self._items

    def collection_ids(self) -> list[str]:
        """Ids of the collections the items belong to, sorted."""
        return sorted(self.holdings())

    def holdings(self) -> dict[str, frozenset[str]]:
        """Collection id -> the asset keys its items carry (for matching a catalog to a profile)."""
        if self._holdings is None:
            if self._items is not None:
                keys: dict[str, set[str]] = {}
                for item in self._items:
                    if item.collection_id:
                        keys.setdefault(item.collection_id, set()).update(item.assets)
                self._holdings = {c: frozenset(k) for c, k in sorted(keys.items())}
            else:
                self._holdings = local_holdings(self.path)
        return self._holdings

    def iter_dicts(
        self,
        collections: Sequence[str],
        bbox: Sequence[float] | None = None,
        datetime: tuple[dt.datetime | None, dt.datetime | None] | None = None,
    ) -> Iterable[dict]:
        """Item dictionaries of ``collections`` whose bbox overlaps ``bbox`` (lon/lat) in the window.

        A coarse filter, read a batch at a time; the caller intersects footprints and applies the
        cloud filter (:func:`item_dict_ok`).
        """
        start, end = (None, None) if datetime is None else (_utc(datetime[0]), _utc(datetime[1]))
        return iter_local_dicts(self.path, collections=collections, bbox=bbox, start=start, end=end)

    def search(
        self,
        collections: Sequence[str],
        intersects: BaseGeometry | dict | None = None,
        datetime: tuple[dt.datetime | str | None, dt.datetime | str | None] | None = None,
        cloud_property: str | None = None,
        max_cloud: float | None = None,
        page_size: int = 100,
    ) -> list[pystac.Item]:
        if self._geoms is None:
            # Item footprints once, so repeated searches (one per modality and year) are cheap.
            self._geoms = [None if it.geometry is None else shape(it.geometry) for it in self.items]
        aoi = _as_geometry(intersects)
        start, end = (None, None) if datetime is None else (_utc(datetime[0]), _utc(datetime[1]))
        wanted = set(collections)
        found = []
        for item, geom in zip(self.items, self._geoms):
            if item.collection_id not in wanted:
                continue
            if aoi is not None and (geom is None or not shapely.intersects(geom, aoi)):
                continue
            if datetime is not None and not _time_ok(item, start, end):
                continue
            if not _cloud_ok(item, cloud_property, max_cloud):
                continue
            found.append(item)
        return sorted(found, key=lambda it: it.id)


class ApiCatalog(Catalog):
    """A STAC API searched with pystac-client."""

    def __init__(self, url: str, client: Any, tries: int):
        self.url = url
        self.source = redact(url)
        self.client = client
        self.tries = tries

    def collection_ids(self) -> list[str] | None:
        """Ids of the API's collections, sorted; None when the API does not list them."""
        try:
            return sorted(c.id for c in self.client.get_collections())
        except Exception as exc:  # only for a message: an API that cannot list is not an error here
            log.info("%s: cannot list collections: %s", self.source, redact_text(str(exc))[:200])
            return None

    def search(
        self,
        collections: Sequence[str],
        intersects: BaseGeometry | dict | None = None,
        datetime: tuple[dt.datetime | str | None, dt.datetime | str | None] | None = None,
        cloud_property: str | None = None,
        max_cloud: float | None = None,
        page_size: int = 100,
    ) -> list[pystac.Item]:
        from pystac_client.conformance import ConformanceClasses
        from pystac_client.exceptions import APIError

        aoi = _as_geometry(intersects)
        kwargs: dict[str, Any] = {"collections": list(collections), "limit": page_size}
        if aoi is not None:
            kwargs["intersects"] = mapping(aoi)
        if datetime is not None:
            kwargs["datetime"] = _interval_text(_utc(datetime[0]), _utc(datetime[1]))
        if max_cloud is not None and cloud_property is not None:
            # Ask the server to filter where it can (fewer pages); the client-side check below
            # runs either way, so the result is the same as a local catalog's.
            if self.client.conforms_to(ConformanceClasses.FILTER):
                kwargs["filter"] = {"op": "<=", "args": [{"property": cloud_property}, max_cloud]}
                kwargs["filter_lang"] = "cql2-json"
            elif self.client.conforms_to(ConformanceClasses.QUERY):
                kwargs["query"] = {cloud_property: {"lte": max_cloud}}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # DoesNotConformTo is handled above
                items = list(self.client.search(**kwargs).items())
        except APIError as exc:
            raise _api_error(self.url, exc, self.tries) from None
        items = [it for it in items if _cloud_ok(it, cloud_property, max_cloud)]
        log.info("%s: %d items in %s", self.source, len(items), ",".join(collections))
        return sorted(items, key=lambda it: it.id)


class ModalityCatalogs(Catalog):
    """One catalog per modality, for a profile whose modalities live in different catalogs.

    Searches and signing go to the modality's own catalog: :meth:`for_modality` by modality name,
    :meth:`search` and :meth:`sign` by collection id (each modality names its own collections).
    """

    def __init__(self, by_modality: dict[str, Catalog], collections: dict[str, Sequence[str]]):
        self.by_modality = dict(by_modality)
        """Modality -> its catalog (modalities sharing a catalog share the object)."""
        self._by_collection = {c: self.by_modality[m] for m, cs in collections.items() for c in cs}
        groups: dict[int, list[str]] = {}
        for name, catalog in self.by_modality.items():
            groups.setdefault(id(catalog), []).append(name)
        self.source = "; ".join(f"{'+'.join(names)}: {self.by_modality[names[0]].source}" for names in groups.values())
        # One scheme when all agree; else None here, and each modality's profile says its own.
        schemes = {c.signing for c in self.by_modality.values()}
        self.signing = schemes.pop() if len(schemes) == 1 else None
        self.headers = None

    def for_modality(self, modality: str) -> Catalog:
        """The modality's own catalog."""
        return self.by_modality[modality]

    def _of(self, collections: Sequence[str]) -> Catalog:
        found = {id(self._by_collection[c]): self._by_collection[c] for c in collections if c in self._by_collection}
        if len(found) != 1:
            raise ConfigError(f"collections {', '.join(collections)} are not those of one modality of {self.source}")
        return next(iter(found.values()))

    def sign(self, href: str, collection: str) -> str:
        """An asset href signed as the catalog of the item's collection says (unchanged if unknown)."""
        catalog = self._by_collection.get(collection)
        return href if catalog is None else catalog.sign(href, collection)

    def collection_ids(self) -> list[str] | None:
        """The collections of every catalog, sorted; None when one cannot list them."""
        ids: set[str] = set()
        for catalog in {id(c): c for c in self.by_modality.values()}.values():
            held = catalog.collection_ids()
            if held is None:
                return None
            ids.update(held)
        return sorted(ids)

    def search(self, collections: Sequence[str], *args: Any, **kwargs: Any) -> list[pystac.Item]:
        """:meth:`Catalog.search` in the catalog of the modality that names ``collections``."""
        return self._of(collections).search(collections, *args, **kwargs)


def _api_error(url: str, exc: Exception, tries: int) -> CatalogError:
    """One clear line for an API failure, with no secrets in it."""
    status = getattr(exc, "status_code", None)
    text = str(exc)
    if status is None or status in RETRY_STATUS:
        if status is not None:
            reason = f"HTTP {status}"
        elif "timed out" in text.lower() or "timeout" in text.lower():
            reason = "timed out"
        elif "refused" in text.lower():
            reason = "connection refused"
        elif "resolve" in text.lower() or "name or service" in text.lower():
            reason = "host name not found"
        else:
            reason = redact_text(text)[:200]
        return CatalogError(
            f"catalog {redact(url)} is unreachable: {reason} after {tries} tries; "
            "check the URL and your network, or try again later"
        )
    detail = redact_text(text).strip().replace("\n", " ")[:200]
    return CatalogError(f"catalog {redact(url)} answered HTTP {status}: {detail}")


def open_catalog(
    url_or_path: str | Path,
    *,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
    headers: dict[str, str] | None = None,
    signing: str | None = None,
) -> Catalog:
    """Open a STAC API (URL) or a local catalog (path).

    Parameters
    ----------
    url_or_path
        ``http(s)://`` URL of a STAC API root, or a path to an ItemCollection JSON, an NDJSON file
        (one item per line), a static catalog (``catalog.json`` or a folder holding one) or a
        stac-geoparquet file (``.parquet``/``.geoparquet``).
    timeout
        Seconds to wait for each HTTP connection and answer.
    retries
        Retries after the first try, on connection errors, timeouts, HTTP 429 and 5xx, with
        exponential backoff (``backoff * 2**n`` seconds, at most 60).
    backoff
        Base of the backoff, in seconds.
    headers
        Extra HTTP headers.
    signing
        None, or ``planetary-computer``: then ``Catalog.sign`` appends a SAS token to asset hrefs
        (the signer is built on first use, once per process; opening fetches no token).

    Returns
    -------
    Catalog

    Raises
    ------
    CatalogError
        If the API cannot be reached or the file cannot be read as STAC.
    """
    text = str(url_or_path)
    if re.match(r"^https?://", text):
        catalog: Catalog = _open_api(text, timeout=timeout, retries=retries, backoff=backoff, headers=headers)
    else:
        catalog = open_local(Path(text))
    if signing is not None and signing not in SIGNING_SCHEMES:
        raise ConfigError(f"unknown signing scheme {signing!r}: use planetary-computer or none")
    catalog.signing = signing
    catalog.headers = dict(headers) if headers else None
    return catalog


def _open_api(url: str, *, timeout: float, retries: int, backoff: float, headers: dict[str, str] | None) -> ApiCatalog:
    import pystac_client
    from pystac_client.exceptions import APIError
    from pystac_client.stac_api_io import StacApiIO
    from urllib3.util.retry import Retry

    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=backoff,
        backoff_max=60.0,
        status_forcelist=RETRY_STATUS,
        allowed_methods=frozenset({"GET", "POST"}),  # searches are safe to repeat
        raise_on_status=False,  # after the last try, hand back the answer so its status is reported
        respect_retry_after_header=True,
    )
    stac_io = StacApiIO(headers=headers, timeout=timeout, max_retries=retry)
    try:
        client = pystac_client.Client.open(url, stac_io=stac_io, timeout=timeout)
    except APIError as exc:
        raise _api_error(url, exc, retries + 1) from None
    except (pystac.STACError, json.JSONDecodeError, KeyError, ValueError) as exc:
        raise CatalogError(f"catalog {redact(url)} is not a STAC API root: {redact_text(str(exc))[:200]}") from None
    log.info("opened STAC API %s", redact(url))
    return ApiCatalog(url, client, retries + 1)


# --- local files --------------------------------------------------------------------------------


def read_items(path: str | Path) -> list[pystac.Item]:
    """Read every item from a local STAC file or static catalog.

    Parameters
    ----------
    path
        ItemCollection JSON, NDJSON, static catalog (``catalog.json`` or its folder), single item
        JSON, or stac-geoparquet.

    Returns
    -------
    list of pystac.Item

    Raises
    ------
    CatalogError
        If the path does not exist or is not STAC.
    """
    path = Path(path)
    if path.is_dir() and (path / "catalog.json").is_file():
        path = path / "catalog.json"
    if not path.is_file():
        raise CatalogError(
            f"catalog {path} does not exist: give a STAC API URL, an item collection (.json, .ndjson), "
            "a static catalog.json or a stac-geoparquet file"
        )
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".geoparquet"):
            return _read_geoparquet(path)
        if suffix in (".ndjson", ".jsonl"):
            return [
                pystac.Item.from_dict(json.loads(line), preserve_dict=False)
                for line in path.read_text().splitlines()
                if line.strip()
            ]
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CatalogError(f"catalog {path} is not valid JSON: {exc}") from None
    except (pystac.STACError, KeyError, TypeError, ValueError) as exc:
        raise CatalogError(f"catalog {path} does not hold valid STAC items: {exc}") from None
    kind = data.get("type") if isinstance(data, dict) else None
    try:
        if kind == "FeatureCollection":
            return list(pystac.ItemCollection.from_dict(data, preserve_dict=False).items)
        if kind == "Feature":
            return [pystac.Item.from_dict(data, preserve_dict=False)]
        if kind in ("Catalog", "Collection"):
            catalog = pystac.read_file(str(path))
            return list(catalog.get_items(recursive=True))
    except (pystac.STACError, KeyError, TypeError, ValueError, OSError) as exc:
        raise CatalogError(f"catalog {path} does not hold valid STAC items: {exc}") from None
    raise CatalogError(
        f"catalog {path} is JSON but not STAC (type {kind!r}): expected a FeatureCollection, a Catalog or an Item"
    )


def _read_geoparquet(path: Path) -> list[pystac.Item]:
    import rustac

    try:
        value = rustac.read_sync(str(path))
    except Exception as exc:  # rustac raises its own error types from Rust
        raise CatalogError(f"catalog {path} is not a readable stac-geoparquet file: {exc}") from None
    features = value.get("features", []) if isinstance(value, dict) else list(value)
    return [pystac.Item.from_dict(f, preserve_dict=False) for f in features]


# --- local catalogs, streamed ---------------------------------------------------------------------

_NDJSON_SUFFIXES = (".ndjson", ".jsonl")


def _is_geoparquet(path: Path) -> bool:
    from rtsmap.pipeline.geoparquet import PARQUET_SUFFIXES

    if path.is_file():
        return path.suffix.lower() in PARQUET_SUFFIXES
    return path.is_dir() and not (path / "catalog.json").is_file() and any(
        p.suffix.lower() in PARQUET_SUFFIXES for p in path.rglob("*"))


def open_local(path: Path) -> LocalCatalog:
    """A local catalog: stac-geoparquet and NDJSON opened lazily, other formats read whole.

    Raises
    ------
    CatalogError
        If the path does not exist or is not STAC.
    """
    if _is_geoparquet(path):
        from rtsmap.pipeline.geoparquet import geoparquet_files

        geoparquet_files(path)  # raises for a folder without parquet files
        return LocalCatalog(path)
    if path.is_file() and path.suffix.lower() in _NDJSON_SUFFIXES:
        return LocalCatalog(path)
    return LocalCatalog(path, read_items(path))


def _ndjson_dicts(path: Path) -> Iterable[dict]:
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CatalogError(f"catalog {path} line {number} is not valid JSON: {exc}") from None
            if not isinstance(data, dict) or data.get("type") != "Feature":
                raise CatalogError(f"catalog {path} line {number} is not a STAC item")
            yield data


def _dict_bbox(data: dict) -> tuple[float, float, float, float] | None:
    bbox = data.get("bbox")
    if bbox and len(bbox) >= 4:
        if len(bbox) == 6:
            return (bbox[0], bbox[1], bbox[3], bbox[4])
        return tuple(bbox[:4])
    if data.get("geometry"):
        return shape(data["geometry"]).bounds
    return None


def _dict_time_ok(props: dict, start: dt.datetime | None, end: dt.datetime | None) -> bool:
    lo, hi = _utc(props.get("start_datetime")), _utc(props.get("end_datetime"))
    if lo is None or hi is None:
        lo = hi = _utc(props.get("datetime"))
    if lo is None or hi is None:
        return False
    return not ((start is not None and hi < start) or (end is not None and lo > end))


def iter_local_dicts(
    path: str | Path,
    *,
    collections: Sequence[str] | None = None,
    bbox: Sequence[float] | None = None,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
) -> Iterable[dict]:
    """Stream the item dictionaries of a local catalog that match collections, bbox and time.

    stac-geoparquet is searched with pushdown; NDJSON is read a line at a time; other formats
    are read whole (they are small by nature). Footprints and clouds are the caller's to test.

    Raises
    ------
    CatalogError
        If the file cannot be read as STAC.
    """
    path = Path(path)
    if _is_geoparquet(path):
        from rtsmap.pipeline.geoparquet import search_geoparquet

        for data in search_geoparquet(path, collections=collections, bbox=bbox, start=start, end=end):
            # pyarrow's filter is on the stored datetimes; re-check with STAC API semantics.
            if (start is None and end is None) or _dict_time_ok(data.get("properties", {}), start, end):
                yield data
        return
    if path.is_file() and path.suffix.lower() in _NDJSON_SUFFIXES:
        source: Iterable[dict] = _ndjson_dicts(path)
    else:
        source = (it.to_dict(include_self_link=False, transform_hrefs=False) for it in read_items(path))
    wanted = None if collections is None else set(collections)
    for data in source:
        if wanted is not None and data.get("collection") not in wanted:
            continue
        if bbox is not None:
            box = _dict_bbox(data)
            if box is None or box[0] > bbox[2] or box[2] < bbox[0] or box[1] > bbox[3] or box[3] < bbox[1]:
                continue
        if (start is not None or end is not None) and not _dict_time_ok(data.get("properties", {}), start, end):
            continue
        yield data


def local_holdings(path: str | Path) -> dict[str, frozenset[str]]:
    """Collection id -> asset keys of a local catalog, read without holding its items.

    stac-geoparquet: the ``collection`` column and the fields of the ``assets`` struct; NDJSON:
    one streamed pass.

    Raises
    ------
    CatalogError
        If the file cannot be read as STAC.
    """
    path = Path(path)
    if _is_geoparquet(path):
        import pyarrow
        import pyarrow.parquet as pq

        from rtsmap.pipeline.geoparquet import geoparquet_files

        keys: dict[str, set[str]] = {}
        for file in geoparquet_files(path):
            try:
                handle = pq.ParquetFile(file)
                names = handle.schema_arrow.names
                assets = handle.schema_arrow.field("assets").type if "assets" in names else None
                asset_keys = {f.name for f in assets} if isinstance(assets, pyarrow.StructType) else set()
                if "collection" in names:
                    collections = pq.read_table(file, columns=["collection"])["collection"].unique().to_pylist()
                else:
                    collections = []
            except (OSError, pyarrow.ArrowException, KeyError) as exc:
                raise CatalogError(f"catalog {file} is not readable stac-geoparquet: {str(exc)[:200]}") from None
            for c in collections:
                if c:
                    keys.setdefault(c, set()).update(asset_keys)
        return {c: frozenset(k) for c, k in sorted(keys.items())}
    found: dict[str, set[str]] = {}
    for data in iter_local_dicts(path):
        if data.get("collection"):
            # stac-geoparquet written from mixed items carries null assets; keep the keys present.
            found.setdefault(data["collection"], set()).update(k for k, v in (data.get("assets") or {}).items() if v)
    return {c: frozenset(k) for c, k in sorted(found.items())}


def item_dict_ok(data: dict, geometry: BaseGeometry | None, cloud_property: str | None,
                 max_cloud: float | None) -> bool:
    """Whether an item dictionary meets a (prepared) WGS84 geometry and the cloud limit."""
    if max_cloud is not None and cloud_property is not None:
        value = (data.get("properties") or {}).get(cloud_property)
        if value is None or float(value) > max_cloud:
            return False
    if geometry is not None:
        if not data.get("geometry"):
            return False
        return bool(shapely.intersects(geometry, shape(data["geometry"])))
    return True


# --- compact item records -----------------------------------------------------------------------


@dataclass(frozen=True)
class ItemRecord:
    """What the planning and the loader need of one item, compact (a pystac.Item is ~20x larger).

    The footprint is kept in the grid CRS (projected once); the rest is the slim item (the
    assets the modality reads with their hrefs and projection, the datetimes, cloud cover and
    processing baseline: :func:`slim_dict`) as compact JSON bytes, turned into a
    ``pystac.Item`` only on the worker that reads it.
    """

    id: str
    """Item id."""
    collection: str
    """Collection id."""
    datetime: str | None
    """Acquisition time (``datetime``, else ``start_datetime``), ISO 8601 in UTC."""
    cloud_cover: float | None
    """The modality's cloud property, if it has one."""
    footprint_wkb: bytes
    """Footprint in the grid CRS (WKB), densified before projection."""
    data: bytes
    """The slim item as JSON (UTF-8)."""

    def to_dict(self) -> dict:
        """The slim item as a dictionary (no links)."""
        return json.loads(self.data)

    def to_item(self) -> pystac.Item:
        """The slim item as a ``pystac.Item`` (what :func:`rtsmap.pipeline.load.load_chunk` takes)."""
        return pystac.Item.from_dict(self.to_dict(), preserve_dict=False)


def record_from_dict(data: dict, modality: ModalityProfile, footprint_wkb: bytes) -> ItemRecord:
    """The compact record of an item dictionary searched for ``modality``.

    Parameters
    ----------
    data
        A STAC item dictionary (from a local catalog or an API page).
    modality
        The modality it was searched for (which assets and properties to keep).
    footprint_wkb
        Its footprint in the grid CRS (WKB).

    Returns
    -------
    ItemRecord
    """
    slim = slim_dict(data, modality)
    props = slim["properties"]
    cloud = props.get(modality.cloud_property) if modality.cloud_property else None
    return ItemRecord(
        id=str(slim["id"]),
        collection=str(slim.get("collection") or ""),
        datetime=props.get("datetime") or props.get("start_datetime"),
        cloud_cover=None if cloud is None else float(cloud),
        footprint_wkb=footprint_wkb,
        data=json.dumps(slim, separators=(",", ":")).encode(),
    )


# --- per-modality search ------------------------------------------------------------------------


def search_modalities(
    catalog: Catalog,
    aoi: Any,
    years: Iterable[int],
    profile: CatalogProfile,
    *,
    modalities: Sequence[str] | None = None,
    page_size: int = 100,
) -> dict[tuple[str, int | None], list[pystac.Item]]:
    """Search every modality of a profile: per year in its season, or once for static ones.

    Parameters
    ----------
    catalog
        From :func:`open_catalog`.
    aoi
        An ``AOI`` (its ``geometry_wgs84`` is used), a shapely geometry in WGS84, or GeoJSON.
    years
        Years to search per-year modalities in.
    profile
        The catalog profile.
    modalities
        Only these modalities of the profile (default: all).
    page_size
        Items per API page.

    Returns
    -------
    dict
        ``(modality, year)`` -> items for per-year modalities, ``(modality, None)`` -> items for
        static ones (DEM).
    """
    geometry = getattr(aoi, "geometry_wgs84", aoi)
    years = sorted(set(int(y) for y in years))
    found: dict[tuple[str, int | None], list[pystac.Item]] = {}
    names = list(profile.modalities) if modalities is None else list(modalities)
    unknown = [n for n in names if n not in profile.modalities]
    if unknown:
        raise ConfigError(
            f"profile {profile.name} has no modality {unknown[0]!r} (it has: {', '.join(profile.modalities)})"
        )
    for name in names:
        modality = profile.modalities[name]
        for year in years if modality.per_year else [None]:
            found[(name, year)] = _search_modality(catalog, geometry, year, modality, page_size)
    return found


def _search_modality(
    catalog: Catalog, geometry: Any, year: int | None, modality: ModalityProfile, page_size: int
) -> list[pystac.Item]:
    window = None
    if year is not None and modality.season is not None:
        window = season_window(year, modality.season)
    items = catalog.for_modality(modality.name).search(
        modality.collections,
        intersects=geometry,
        datetime=window,
        cloud_property=modality.cloud_property,
        max_cloud=modality.max_cloud,
        page_size=page_size,
    )
    log.info("%s %s: %d items", modality.name, year if year is not None else "(static)", len(items))
    return [slim_item(item, modality) for item in items]


# --- what the loader needs of an item -----------------------------------------------------------

# Item properties the loader and the planning read, besides proj:* (kept whole) and the
# modality's cloud and offset-rule properties.
_KEPT_PROPERTIES = ("datetime", "start_datetime", "end_datetime", "platform", "constellation")


def _iso(value: Any) -> str | None:
    """A STAC datetime in one spelling (``YYYY-MM-DDTHH:MM:SS.ffffffZ``); None stays None.

    Saved items spell them in several ways: Planetary Computer's Sentinel-1 RTC writes
    ``2024-04-19 04:59:04.220006+00:00`` (a space, an offset).
    """
    if value is None:
        return None
    try:
        when = _utc(str(value))
    except ValueError:
        when = pystac.utils.str_to_datetime(str(value)).astimezone(dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def slim_dict(data: dict, modality: ModalityProfile) -> dict:
    """The part of an item dictionary the pipeline reads, with no links (see :func:`slim_item`)."""
    props = data.get("properties") or {}
    wanted = set(_KEPT_PROPERTIES)
    wanted.update(k for k in (modality.cloud_property, getattr(modality.offset_rule, "property", None)) if k)
    kept = {k: v for k, v in props.items() if k in wanted or k.startswith("proj:")}
    for key in ("datetime", "start_datetime", "end_datetime"):
        if key in kept:
            kept[key] = _iso(kept[key])
    kept.setdefault("datetime", None)
    keys = {band.asset for band in modality.bands}
    if modality.mask is not None:
        keys.add(modality.mask.asset)
    source_assets = data.get("assets") or {}
    assets = {}
    for key in sorted(keys & {k for k, v in source_assets.items() if v}):
        asset = {k: v for k, v in source_assets[key].items() if v is not None}
        asset.pop("alternate", None)  # other hrefs (s3://...) the loader never reads
        assets[key] = asset
    return {
        "type": "Feature",
        "stac_version": data.get("stac_version") or pystac.get_stac_version(),
        "stac_extensions": list(data.get("stac_extensions") or []),
        "id": data["id"],
        "collection": data.get("collection"),
        "geometry": data.get("geometry"),
        "bbox": list(data["bbox"]) if data.get("bbox") is not None else None,
        "properties": kept,
        "links": [],
        "assets": assets,
    }


def slim_item(item: pystac.Item, modality: ModalityProfile) -> pystac.Item:
    """The part of an item the pipeline reads, with no links, so nothing is ever resolved.

    Items saved from an API carry absolute ``root``/``self``/``parent``/``collection`` links to
    that API; pystac follows them (over the network) to make hrefs absolute when an item is
    turned into a dictionary. The copy keeps the id, collection, datetimes (in one spelling),
    geometry and bbox, every ``proj:*`` property, the cloud and offset-rule properties, and only
    the assets the modality reads (whole: href, type, ``raster:bands``, asset-level ``proj:*``).

    Parameters
    ----------
    item
        An item as searched.
    modality
        The modality it was searched for (which assets and properties to keep).

    Returns
    -------
    pystac.Item
        A new item without links.
    """
    data = {
        "id": item.id,
        "collection": item.collection_id,
        "geometry": item.geometry,
        "bbox": item.bbox,
        "stac_extensions": list(item.stac_extensions),
        "stac_version": pystac.get_stac_version(),
        "properties": item.properties,
        "assets": {k: a.to_dict() for k, a in item.assets.items()},
    }
    return pystac.Item.from_dict(slim_dict(data, modality), preserve_dict=False)


# --- signing (Planetary Computer) ---------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def shared_signer(signing: str | None) -> Callable[[str, str], str]:
    """The process's one signer for a signing scheme, built on first use.

    Dask worker processes run many tasks; each building its own signer would repeat the set-up
    (and, for signers that keep their own tokens, the token fetches) per task. Tasks and
    ``Catalog.sign`` share this one per process.

    Parameters
    ----------
    signing
        ``planetary-computer`` or None.

    Returns
    -------
    callable
        ``(href, collection) -> href`` (from :func:`make_signer`).
    """
    return make_signer(signing)
