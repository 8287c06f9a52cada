"""The two error classes every part of rtsmap shares, torch-free and import-free.

They live at the package root so that ``rtsmap.models`` (which never imports
``rtsmap.pipeline``) and ``rtsmap.pipeline`` raise the same :class:`ConfigError`;
``rtsmap.pipeline.errors`` re-exports both, so ``pipeline.errors.ConfigError`` is this class.
The CLI prints ``error: <message>`` for any :class:`RtsmapError` and exits with status 2.
"""


class RtsmapError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(RtsmapError, ValueError):
    """A configuration file or option is invalid.

    Also a ``ValueError``: a bad value is what it reports, callers that caught ``ValueError``
    from the older readers keep working, and pydantic turns it, raised inside a validator, into
    a validation error that carries the key's path.
    """
