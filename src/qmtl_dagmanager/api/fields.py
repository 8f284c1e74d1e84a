"""Declaring a custom resource's fields once.

A model is a frozen, keyword-only dataclass. Each attribute's type gives the OpenAPI type and
its `field(...)` metadata gives the JSON name (camelCase of the attribute unless named), the
documentation `kubectl explain` shows and the OpenAPI constraints. From that one declaration
`schema()` builds the structural schema of the CRD and `parse()` reads a body into the model,
with errors that name the offending field's path. `unknown()` lists the keys of a body the
schema does not declare (the API server would prune them).

Types: str, bool, int, float, a StrEnum, a model, `X | None`, `tuple[X, ...]`, `dict[str, X]`,
`IntOrString` and `Free` (an object kept as it is).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
from collections.abc import Mapping
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from qmtl_dagmanager.core.errors import InvalidSpec

Free = dict[str, Any]  # an object kept as it is: x-kubernetes-preserve-unknown-fields
IntOrString = int | str  # x-kubernetes-int-or-string (durations: 90, "90", "1h30m")

M = TypeVar("M")
_KEY = "qmtl.io/api"


@dataclasses.dataclass(frozen=True)
class Meta:
    """What a field declares beyond its type."""

    doc: str
    name: str | None = None  # the JSON name; default: camelCase of the attribute
    required: bool = False
    publish_default: bool = False  # write the default into the schema
    openapi: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def field(
    doc: str,
    *,
    name: str | None = None,
    required: bool = False,
    default: Any = dataclasses.MISSING,
    factory: Any = dataclasses.MISSING,
    publish_default: bool = False,
    extra: Mapping[str, Any] | None = None,
    **openapi: Any,
) -> Any:
    """A model field. `openapi` holds constraints in their OpenAPI spelling (minimum,
    maxLength, format, enum, ...), `extra` keywords no Python name can spell."""
    meta = Meta(doc, name, required, publish_default, {**openapi, **(extra or {})})
    metadata = {_KEY: meta}
    if required:
        return dataclasses.field(metadata=metadata)
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    if default is dataclasses.MISSING:
        default = None  # an optional field without a default is absent
    return dataclasses.field(default=default, metadata=metadata)


def immutable(name: str) -> dict[str, Any]:
    """An API server rule (CEL transition rule) that refuses any change of the field once set,
    with a message naming it."""
    return {
        "x-kubernetes-validations": [
            {
                "rule": "self == oldSelf",
                "message": f"{name} is immutable: delete the resource and create a new one",
            }
        ]
    }


def json_name(f: dataclasses.Field[Any]) -> str:
    meta = _meta(f)
    if meta.name:
        return meta.name
    head, *rest = f.name.rstrip("_").split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _meta(f: dataclasses.Field[Any]) -> Meta:
    meta = f.metadata.get(_KEY)
    if not isinstance(meta, Meta):
        raise TypeError(f"{f.name}: a model field is declared with api.fields.field()")
    return meta


def _fields(model: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = get_type_hints(model)
    return [(f, hints[f.name]) for f in dataclasses.fields(model)]


def _optional(tp: Any) -> Any:
    """X for `X | None`, else tp."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_int_or_string(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and set(get_args(tp)) == {int, str}


# --------------------------------------------------------------------------- schema


def schema(tp: Any) -> dict[str, Any]:
    """The OpenAPI (structural) schema of a type."""
    tp = _optional(tp)
    if _is_int_or_string(tp):
        return {"x-kubernetes-int-or-string": True}
    if tp is Any or tp == Free:
        return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"type": "string", "enum": [m.value for m in tp]}
    scalar = {str: "string", bool: "boolean", int: "integer", float: "number"}
    if tp in scalar:
        return {"type": scalar[tp]}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        props: dict[str, Any] = {}
        required = []
        for f, hint in _fields(tp):
            meta, key = _meta(f), json_name(f)
            prop = {**schema(hint), **meta.openapi, "description": meta.doc}
            if meta.publish_default and f.default is not dataclasses.MISSING:
                prop["default"] = f.default.value if isinstance(f.default, enum.Enum) else f.default
            props[key] = prop
            if meta.required:
                required.append(key)
        out: dict[str, Any] = {"type": "object", "properties": props}
        if required:
            out["required"] = required
        return out
    origin, args = get_origin(tp), get_args(tp)
    if origin in (tuple, list):
        return {"type": "array", "items": schema(args[0])}
    if origin is dict:
        if args[1] is Any:
            return schema(Free)
        return {"type": "object", "additionalProperties": schema(args[1])}
    raise TypeError(f"no schema for {tp!r}")


# --------------------------------------------------------------------------- parsing


def _bad(path: str, message: str, reason: str = "InvalidField") -> InvalidSpec:
    return InvalidSpec(f"{path}: {message}", reason=reason)


def parse(model: type[M], body: object, path: str = "spec") -> M:
    """The body as the model; the first field that does not fit is an InvalidSpec naming its
    path (`spec.steps[2].weight: ...`). Keys the model does not declare are ignored."""
    value: M = _read(model, body, path)
    return value


def _read(tp: Any, value: object, path: str) -> Any:
    inner = _optional(tp)
    if value is None and inner is not tp:
        return None
    tp = inner
    if _is_int_or_string(tp):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise _bad(path, f"{value!r} is neither an integer nor a string")
        return value
    if tp is Any or tp == Free:
        if not isinstance(value, Mapping):
            raise _bad(path, "expected an object")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in tp)
            raise _bad(path, f"{value!r} is not one of {allowed}") from None
    if tp is str:
        if not isinstance(value, str):
            raise _bad(path, f"expected a string, got {type(value).__name__}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(path, f"{value!r} is not an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad(path, f"{value!r} is not a number")
        if not math.isfinite(value):
            raise _bad(path, "must be finite")
        return float(value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _read_model(tp, value, path)
    origin, args = get_origin(tp), get_args(tp)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise _bad(path, "expected a list")
        items = [_read(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _bad(path, "expected an object")
        return {str(k): _read(args[1], v, f"{path}.{k}") for k, v in value.items()}
    raise TypeError(f"cannot read {tp!r}")


def _read_model(model: type, value: object, path: str) -> Any:
    if not isinstance(value, Mapping):
        raise _bad(path, "expected an object")
    kwargs: dict[str, Any] = {}
    for f, hint in _fields(model):
        meta, key = _meta(f), json_name(f)
        at = f"{path}.{key}"
        raw = value.get(key)
        if raw is None:
            if meta.required:
                raise _bad(at, "is required", "MissingField")
            continue
        read = _read(hint, raw, at)
        _check(meta.openapi, read, at)
        kwargs[f.name] = read
    return model(**kwargs)


def _check(rules: Mapping[str, Any], value: Any, path: str) -> None:
    """The constraints the schema states, so a body the API server did not check (an older
    CRD, a direct call) fails the same way."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in rules and value < rules["minimum"]:
            raise _bad(path, f"{value!r} is below the minimum {rules['minimum']}")
        if "maximum" in rules and value > rules["maximum"]:
            raise _bad(path, f"{value!r} is above the maximum {rules['maximum']}")
    if isinstance(value, str):
        if "minLength" in rules and len(value) < rules["minLength"]:
            raise _bad(path, f"must be at least {rules['minLength']} characters")
        if "maxLength" in rules and len(value) > rules["maxLength"]:
            raise _bad(path, f"must be at most {rules['maxLength']} characters")
        if "enum" in rules and value not in rules["enum"]:
            raise _bad(path, f"{value!r} is not one of {', '.join(rules['enum'])}")
    if isinstance(value, tuple | list):
        if "minItems" in rules and len(value) < rules["minItems"]:
            raise _bad(path, f"needs at least {rules['minItems']} items", "MissingField")
        if "maxItems" in rules and len(value) > rules["maxItems"]:
            raise _bad(path, f"has more than {rules['maxItems']} items", "TooManyItems")


def unknown(model: type, body: Mapping[str, Any], path: str = "") -> list[str]:
    """Paths of keys in a body that the model does not declare (pruned by the API server)."""
    out: list[str] = []
    declared = {json_name(f): hint for f, hint in _fields(model)}
    for key, value in body.items():
        at = f"{path}.{key}" if path else key
        if key not in declared:
            out.append(at)
            continue
        tp = _optional(declared[key])
        origin = get_origin(tp)
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            out += unknown(tp, value, at)  # type: ignore[arg-type]
        elif origin in (tuple, list) and isinstance(value, list):
            item = get_args(tp)[0]
            if dataclasses.is_dataclass(item):
                for i, v in enumerate(value):
                    if isinstance(v, Mapping):
                        out += unknown(item, v, f"{at}[{i}]")  # type: ignore[arg-type]
    return out
