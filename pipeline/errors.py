"""Errors that end a run with one clear line.

Every stage raises a subclass of :class:`RtsmapError` for input it cannot use
(a broken AOI, a catalog that is down, a model that does not match the data).
The CLI prints ``error: <message>`` and exits non-zero without a traceback;
anything else is a bug and keeps its traceback.
"""

# Defined at the package root so that models/ (which never imports pipeline/) raises the same class.
from rtsmap.errors import ConfigError, RtsmapError

__all__ = ["AOIError", "AssetError", "CatalogError", "ConfigError", "ModelError", "OutputError", "RtsmapError"]


class AOIError(RtsmapError):
    """The area of interest cannot be read or has no usable geometry."""


class CatalogError(RtsmapError):
    """A STAC catalog cannot be reached or answered with an error."""


class AssetError(RtsmapError):
    """A raster asset is missing, unreadable or corrupt (fails one chunk, not the run)."""


class ModelError(RtsmapError):
    """A model file is missing, unreadable, or does not match the data."""


class OutputError(RtsmapError):
    """An output path exists (and overwrite was not asked for) or cannot be written."""
