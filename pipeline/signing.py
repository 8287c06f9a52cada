"""Sign asset hrefs just before they are read: Planetary Computer SAS tokens.

Planetary Computer keeps its data in Azure Blob Storage; an href there is readable only with a
SAS token appended. Microsoft's ``planetary-computer`` package does the signing:
``planetary_computer.sign_url`` fetches one token per storage account and container from the
SAS endpoint (``PC_SDK_SAS_URL``, default the Planetary Computer's; ``PC_SDK_SUBSCRIPTION_KEY``
for a subscription key; both also read from ``~/.planetarycomputer/settings.env``), keeps it in
a process-wide cache until a minute before it expires, retries the endpoint on 429/5xx, and leaves
hrefs outside ``*.blob.core.windows.net`` unchanged.

What this module adds: :meth:`PlanetaryComputerSigner.resign`, which drops the cached token of
an href's container and signs it anew, for a read that got HTTP 403 (the token expired between
signing and reading, or was revoked); and error messages without secrets.

Tokens and signed URLs never appear in logs or messages: every message that holds a URL passes
through :func:`rtsmap.pipeline.stac.redact_text`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from rtsmap.pipeline.errors import CatalogError, ConfigError
from rtsmap.pipeline.profiles import CatalogProfile

#: Query keys a SAS token is made of (Azure's names); removed before a token is replaced.
SAS_KEYS = frozenset(
    {"sv", "ss", "srt", "st", "se", "sp", "sig", "sr", "spr", "sip", "si", "skoid", "sktid", "skt", "ske", "sks", "skv", "sdd", "rscc", "rscd", "rsce", "rscl", "rsct"}
)


def strip_sas(href: str) -> str:
    """``href`` without the query keys of a SAS token (other query keys are kept).

    Parameters
    ----------
    href
        A URL, signed or not.

    Returns
    -------
    str
    """
    parts = urlsplit(href)
    if not parts.query:
        return href
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in SAS_KEYS]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(kept), parts.fragment))


class PlanetaryComputerSigner:
    """Signs Azure Blob Storage hrefs with ``planetary_computer.sign_url``; callable as ``(href, collection)``.

    One token per storage container, fetched from the SAS endpoint the package is configured
    with and cached by the package until shortly before it expires. Thread-safe: Dask worker
    threads share one signer.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, href: str, collection: str | None = None) -> str:
        """``href`` with its container's SAS token; hrefs outside Azure Blob Storage and hrefs
        already signed come back unchanged.

        Parameters
        ----------
        href
            Asset href.
        collection
            The item's collection (unused: tokens are per container; kept so every signer has
            the same call).

        Returns
        -------
        str

        Raises
        ------
        CatalogError
            The SAS endpoint cannot be reached or answers without a token.
        """
        import planetary_computer
        import pydantic
        import requests

        with self._lock:
            try:
                return planetary_computer.sign_url(href)
            except (requests.RequestException, ValueError, KeyError, TypeError, pydantic.ValidationError) as exc:
                from rtsmap.pipeline.stac import redact, redact_text

                endpoint = planetary_computer.settings.Settings.get().sas_url
                raise CatalogError(
                    f"could not get a Planetary Computer SAS token for {redact(href)} from "
                    f"{redact(str(endpoint))}: {redact_text(str(exc))[:200]}; check the network and "
                    "PC_SDK_SAS_URL / PC_SDK_SUBSCRIPTION_KEY"
                ) from None

    sign = __call__

    def resign(self, href: str, collection: str | None = None) -> str:
        """Sign ``href`` anew, for a read that got HTTP 403: its SAS query is removed and, unless
        the cache already holds a newer token than the one ``href`` carries (another asset was
        renewed first), its container's cached token is dropped so a fresh one is fetched.

        Parameters, Returns and Raises as for calling the signer.
        """
        from planetary_computer import sas, settings, utils

        bare = strip_sas(href)
        parts = urlsplit(bare)
        if parts.netloc.endswith(sas.BLOB_STORAGE_DOMAIN):
            account, container = utils.parse_blob_url(parts)
            key = f"{settings.Settings.get().sas_url}/{account}/{container}"
            used = dict(parse_qsl(urlsplit(href).query)).get("sig")
            with self._lock:
                cached = sas.TOKEN_CACHE.get(key)
                if cached is not None and (used is None or dict(parse_qsl(cached.token)).get("sig") == used):
                    del sas.TOKEN_CACHE[key]
        return self(bare, collection)


def _unsigned(href: str, collection: str | None = None) -> str:
    """Identity: hrefs of unsigned catalogs are read as they are."""
    return href


def make_signer(signing: CatalogProfile | str | None, **kwargs: Any) -> Callable[[str, str], str]:
    """A function ``(href, collection) -> href`` to call on each asset href just before reading it.

    Parameters
    ----------
    signing
        A catalog profile (its ``signing`` picks the scheme), a scheme name
        (``planetary-computer``) or None.
    **kwargs
        None are taken any more: the SAS endpoint comes from ``PC_SDK_SAS_URL`` (see the module
        docstring); given for callers of the old signature, they raise ConfigError.

    Returns
    -------
    callable
        A :class:`PlanetaryComputerSigner` (which also has ``resign``), or the identity for
        unsigned catalogs.

    Raises
    ------
    ConfigError
        An unknown scheme, or keyword arguments.
    """
    if kwargs:
        raise ConfigError(
            f"make_signer takes no options ({', '.join(sorted(kwargs))}); set the SAS endpoint with PC_SDK_SAS_URL"
        )
    scheme = signing.signing if isinstance(signing, CatalogProfile) else signing
    if scheme == "planetary-computer":
        return PlanetaryComputerSigner()
    if scheme is not None:
        raise ConfigError(f"unknown signing scheme {scheme!r}: use planetary-computer or none")
    return _unsigned
