"""One strict reader for rtsmap's YAML files: run configs, catalog profiles, training configs.

Torch-free and free of ``rtsmap.pipeline`` imports, so both ``pipeline/`` and ``models/`` use it.
The public configuration types stay plain frozen dataclasses; their field annotations use the
strict types below, and pydantic validates a YAML mapping straight into them:

- every key must be a field (a typo is an error, never a silent default);
- scalars are strict: ``true`` is not an integer, ``3`` is not a string, ``"3"`` is not an
  integer; integers are accepted for float fields;
- the one coercion: a *string* that Python's ``float()`` reads is accepted for a *float* field,
  because YAML 1.1 reads ``1e-4`` (no dot) as a string and a user who wrote it meant a number;
  ``nan`` and ``inf`` are refused;
- YAML has no tuples, so lists fill tuple fields;
- ranges are part of the types (``PositiveInt``, ``Fraction``, ...).

Every failure is one :class:`~rtsmap.errors.ConfigError` line naming the file and the key path,
e.g. ``run.yaml: inference.batch_size: expected an integer >= 1, got 'abc'``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at
import yaml
from pydantic import BeforeValidator, ConfigDict, Strict, TypeAdapter, ValidationError, with_config

from rtsmap.errors import ConfigError

#: Configuration of every schema: unknown keys are refused, and no NaN or infinity.
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def schema(cls: type) -> type:
    """Class decorator: validate this dataclass with :data:`STRICT` (applies to nested ones too)."""
    return with_config(STRICT)(cls)


def _float_text(value: Any) -> Any:
    """A string that ``float()`` reads exactly becomes that float (YAML 1.1 reads ``1e-4`` as text)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # the strict float check below refuses it with the key's name
    return value


Int = Annotated[int, Strict()]
"""An integer; ``true``/``false`` and ``"3"`` are refused."""
Float = Annotated[float, Strict(), BeforeValidator(_float_text)]
"""A finite number: an int, a float, or a string that ``float()`` reads (``"1e-4"``)."""
Str = Annotated[str, Strict()]
"""A string; numbers and booleans are refused."""
Bool = Annotated[bool, Strict()]
"""``true`` or ``false`` only."""
PositiveInt = Annotated[Int, at.Ge(1)]
"""An integer >= 1 (batch sizes, counts that cannot be zero)."""
NonNegativeInt = Annotated[Int, at.Ge(0)]
"""An integer >= 0."""
PositiveFloat = Annotated[Float, at.Gt(0)]
"""A number > 0 (learning rates, timeouts)."""
NonNegativeFloat = Annotated[Float, at.Ge(0)]
"""A number >= 0."""
Fraction = Annotated[Float, at.Ge(0), at.Le(1)]
"""A number in [0, 1]."""


# --- reading YAML -------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may repeat keys on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable: construct_mapping refuses it with its own message
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path, what: str, missing_hint: str = "") -> dict[str, Any]:
    """Read a YAML file that must hold a mapping.

    Parameters
    ----------
    path
        The file.
    what
        What it is, for the message about a missing file (``profile``, ``training config``).
    missing_hint
        Appended to that message (e.g. how else the thing can be given).

    Returns
    -------
    dict
        The mapping, as YAML read it.

    Raises
    ------
    ConfigError
        One line naming the file: missing, unreadable, not YAML (with line and column), empty,
        a key given twice, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist{missing_hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "cannot be parsed"
        raise ConfigError(f"{path}: is not valid YAML{where}: {_one_line(problem)}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: is not valid YAML: {_one_line(str(exc))}") from None
    except RecursionError:
        raise ConfigError(f"{path}: is not valid YAML: nested too deeply") from None
    if data is None:
        raise ConfigError(f"{path}: is empty; expected a mapping of keys to values")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values, not {_yaml_kind(data)}")
    return data


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _yaml_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    return f"a {type(value).__name__}"


# --- validating ---------------------------------------------------------------------------------

_ADAPTERS: dict[Any, TypeAdapter] = {}


def _adapter(tp: Any) -> TypeAdapter:
    # Building an adapter costs milliseconds; configs are read a few times per process.
    if tp not in _ADAPTERS:
        _ADAPTERS[tp] = TypeAdapter(tp)
    return _ADAPTERS[tp]


def validate(
    tp: Any,
    data: Any,
    source: str | None,
    *,
    root: str | None = None,
    from_elsewhere: Collection[str] = (),
) -> Any:
    """Validate ``data`` into ``tp`` (a dataclass or any annotation built from this module's types).

    Parameters
    ----------
    tp
        The target type.
    data
        What YAML (or a caller) gave.
    source
        The file the data came from, named first in the message; None names no file.
    root
        Prefix of every key path (``profile`` gives ``profile.url``).
    from_elsewhere
        Dotted keys that did not come from ``source`` (command-line flags): an error at or
        under one of them names no file.

    Returns
    -------
    An instance of ``tp``.

    Raises
    ------
    ConfigError
        One line: ``<source>: <key path>: <what is wrong>``, for the first problem found.
    """
    try:
        return _adapter(tp).validate_python(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # A misspelt key shows as an unknown key and as a missing one; the unknown key is the cause.
        unknown = [e for e in errors if e["type"] in ("extra_forbidden", "unexpected_keyword_argument")]
        first = (unknown or errors)[0]
        raise ConfigError(describe(first, tp, source, root=root, from_elsewhere=from_elsewhere)) from None


def describe(
    error: Any, tp: Any, source: str | None, *, root: str | None = None, from_elsewhere: Collection[str] = ()
) -> str:
    """One line for one pydantic error (see :func:`validate`)."""
    loc = tuple(part for part in error["loc"] if part != "[key]")
    key = _dotted(((root,) if root else ()) + loc)
    plain = _dotted(loc)
    if any(plain == k or plain.startswith(k + ".") or plain.startswith(k + "[") for k in from_elsewhere):
        source = None
    prefix = f"{source}: " if source else ""
    kind = error["type"]
    got = _show(error.get("input"))
    parent, annotation, required = _walk(tp, loc)
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        known = _field_names(parent)
        hint = f" (known: {', '.join(known)})" if known else ""
        return f"{prefix}unknown key '{key}'{hint}"
    if kind == "invalid_key":  # YAML allows keys such as 1 or null; a mapping of settings does not
        inside = _dotted(((root,) if root else ()) + loc[:-1])
        return f"{prefix}{inside + ': ' if inside else ''}key {got} is not a string"
    if kind in ("missing", "missing_argument", "missing_keyword_only_argument", "missing_positional_argument"):
        return f"{prefix}'{key}' is required"
    if error.get("input") is None and required and kind.endswith("_type"):
        return f"{prefix}'{key}' is required (got null)"
    where = f"{prefix}{key}: " if key else prefix
    if kind == "value_error" and not loc:  # a check of the whole object: its message names the field
        where = prefix
    if kind == "value_error":
        cause = (error.get("ctx") or {}).get("error")
        return f"{where}{cause if cause is not None else error['msg']}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bounds = _bounds(annotation) or _ctx_bounds(error.get("ctx") or {})
        return f"{where}must be {bounds}, got {got}"
    if kind == "finite_number":
        return f"{where}expected a finite number, got {got}"
    if kind in ("too_short", "too_long"):
        ctx = error.get("ctx") or {}
        fewest, most = ctx.get("min_length"), ctx.get("max_length")
        if fewest is not None and fewest == most:
            size = f"exactly {fewest}"
        elif kind == "too_short":
            size = f"at least {fewest}"
        else:
            size = f"at most {most}"
        return f"{where}needs {size} item(s), got {ctx.get('actual_length')}"
    expected = _expected(annotation) if annotation is not None else None
    if expected:
        return f"{where}expected {expected}, got {got}"
    return f"{where}{error['msg'][:1].lower()}{error['msg'][1:]}, got {got}"


def _dotted(parts: tuple) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        else:
            name = str(part)
            if not name.isprintable():  # a key with a newline must not break the one-line message
                name = name.encode("unicode_escape").decode("ascii")
            text += ("." if text else "") + name
    return text


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unwrap(tp: Any) -> tuple[Any, list, bool]:
    """Strip ``Annotated`` and ``| None``: (bare type, metadata, whether None is allowed)."""
    meta: list = []
    optional = False
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            meta.extend(tp.__metadata__)
            tp = tp.__origin__
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(tp))
            if len(args) != 1:
                return tp, meta, optional
            tp = args[0]
        else:
            return tp, meta, optional


def _walk(tp: Any, loc: tuple) -> tuple[Any, Any, bool]:
    """Follow ``loc`` through dataclasses, tuples and dicts.

    Returns (the dataclass holding the last key or None, the annotation at ``loc`` or None,
    whether that key is a required field).
    """
    parent, required = None, False
    for part in loc:
        bare, _, _ = _unwrap(tp)
        origin, args = typing.get_origin(bare), typing.get_args(bare)
        if dataclasses.is_dataclass(bare):
            hints = typing.get_type_hints(bare, include_extras=True)
            fields = {f.name: f for f in dataclasses.fields(bare) if f.init}
            if part not in fields:
                return bare, None, False
            field = fields[part]
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            parent, tp = bare, hints[part]
        elif origin in (tuple, list) and args and isinstance(part, int):
            if len(args) == 2 and args[1] is Ellipsis or origin is list:
                tp = args[0]
            elif part < len(args):
                tp = args[part]
            else:
                return None, None, False
            parent, required = None, False
        elif origin is dict and len(args) == 2:
            parent, required, tp = None, False, args[1]
        else:
            return None, None, False
    return parent, tp, required


def _field_names(cls: Any) -> list[str]:
    if cls is None or not dataclasses.is_dataclass(cls):
        return []
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _bounds(annotation: Any) -> str:
    """``>= 1``, ``> 0`` or ``in [0, 1]`` from a type's annotated-types metadata ('' if none)."""
    if annotation is None:
        return ""
    _, meta, _ = _unwrap(annotation)
    low = high = None
    for item in meta:
        for name in ("gt", "ge", "lt", "le"):
            value = getattr(item, name, None)
            if value is not None and not callable(value):
                if name in ("gt", "ge"):
                    low = (">" if name == "gt" else ">=", value)
                else:
                    high = ("<" if name == "lt" else "<=", value)
    if low and high:
        left = "(" if low[0] == ">" else "["
        right = ")" if high[0] == "<" else "]"
        return f"in {left}{low[1]}, {high[1]}{right}"
    if low:
        return f"{low[0]} {low[1]}"
    if high:
        return f"{high[0]} {high[1]}"
    return ""


def _ctx_bounds(ctx: dict) -> str:
    for name, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if name in ctx:
            return f"{sign} {ctx[name]}"
    return "in range"


def _expected(annotation: Any) -> str:
    """What a value of this type looks like, in words (``an integer >= 1``, ``a string or null``)."""
    bare, _, optional = _unwrap(annotation)
    origin = typing.get_origin(bare)
    if origin is Literal:
        words = "one of " + ", ".join(repr(v) for v in typing.get_args(bare))
    elif bare is bool:
        words = "true or false"
    elif bare is int:
        words = "an integer"
    elif bare is float:
        words = "a number"
    elif bare is str:
        words = "a string"
    elif origin in (tuple, list) or bare in (tuple, list):
        words = "a list"
    elif origin is dict or bare is dict or dataclasses.is_dataclass(bare):
        words = "a mapping"
    else:
        return ""
    bounds = _bounds(annotation)
    if bounds:
        words += f" {bounds}"
    return words + (" or null" if optional else "")


__all__ = [
    "Bool",
    "ConfigError",
    "Float",
    "Fraction",
    "Int",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveFloat",
    "PositiveInt",
    "STRICT",
    "Str",
    "describe",
    "read_yaml",
    "schema",
    "validate",
]
