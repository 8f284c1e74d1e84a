"""Node identity exactly as the Gateway computes it (contract §5): NodeID, CRC32, ComputeKey.

These functions work on the node object as submitted (a JSON object decoded to a dict), so the
same code serves validation ("does the submitted id match?") and the test vectors.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NewType

import blake3
import orjson

NodeId = NewType("NodeId", str)
ComputeKey = NewType("ComputeKey", str)

NODE_ID_PREFIX = "blake3:"
TAG_QUERY_NODE = "TagQueryNode"
UNIT_SEPARATOR = "\x1f"

# Keys dropped from params at every depth (compared lower-cased): they describe the context a
# node runs in, or are nondeterministic, and must not change its identity.
CONTEXT_KEYS = frozenset(
    {
        "world",
        "world_id",
        "world_ids",
        "execution_world",
        "execution_domain",
        "domain",
        "domains",
        "as_of",
        "partition",
        "dataset_fingerprint",
        "timestamp",
        "seed",
        "random_state",
        "env",
    }
)


class IdentityError(ValueError):
    """A field that identity needs cannot be read (for example a non-integer interval)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _dropped(key: str) -> bool:
    low = key.lower()
    return low in CONTEXT_KEYS or low.startswith("env_")


def _strip_context(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _strip_context(v) for k, v in value.items() if not _dropped(str(k))}
    if isinstance(value, list):
        return [_strip_context(v) for v in value]
    return value


class _NotPlain(Exception):
    """A value whose orjson encoding could differ from `canonical_json`'s."""


_INT_MIN, _INT_MAX = -(2**63), 2**64  # what orjson encodes as an integer


def _strip_plain(value: Any) -> Any:
    """`_strip_context` for values orjson encodes exactly as `canonical_json` does: str keys,
    lists, strings, booleans, null, 64-bit integers and floats that Python writes without an
    exponent (orjson writes 1e-05 as 0.00001). Anything else raises `_NotPlain`."""
    kind = type(value)
    if kind is dict:
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise _NotPlain
            if _dropped(k):
                continue
            out[k] = _strip_plain(v)
        return out
    if kind is list:
        return [_strip_plain(v) for v in value]
    if kind is str or kind is bool or value is None:
        return value
    if kind is int and _INT_MIN <= value < _INT_MAX:
        return value
    if kind is float and (value == 0 or 1e-4 <= abs(value) < 1e16):  # NaN and inf fail
        return value
    raise _NotPlain


def canonical_params(params: Any) -> str:
    """`canonical_json(_strip_context(params))`, through orjson when that gives the same
    text (several times faster: NodeIDs are verified on the Gateway's budget)."""
    try:
        return orjson.dumps(_strip_plain(params), option=orjson.OPT_SORT_KEYS).decode()
    except (_NotPlain, orjson.JSONEncodeError):  # lone surrogates, nesting past orjson's limit
        return canonical_json(_strip_context(params))


def canonical_json(value: Any) -> str:
    """Compact, key-sorted JSON with non-ASCII kept raw and floats in shortest round-trip form."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def as_int(value: Any, field: str) -> int:
    """`int()` of the value as the SDK does: missing/null → 0, floats truncate, digit strings
    parse; anything else is an error naming the field."""
    if not value:  # missing, null, 0, "" and false are all 0 (the SDK's `int(v or 0)`)
        return 0
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise IdentityError(field, f"invalid {field}: {value!r} is not an integer") from None
    raise IdentityError(field, f"invalid {field}: expected an integer, got {type(value).__name__}")


def params_of(node: Mapping[str, Any]) -> Any:
    params = node.get("params")
    return node.get("config") if params is None else params


def split_tags(value: Any) -> list[str]:
    """Tags as a list of stripped, non-empty strings (a comma-separated string is split)."""
    if isinstance(value, str):
        items: Iterable[Any] = value.split(",")
    elif isinstance(value, list | tuple):
        items = value
    else:
        return []
    return [s for s in (str(t).strip() for t in items if t is not None) if s]


def tag_query_spec(node: Mapping[str, Any]) -> tuple[tuple[str, ...], str, int]:
    """(query_tags sorted and unique, match_mode any|all, interval) of a TagQueryNode."""
    params = params_of(node)
    p: Mapping[str, Any] = params if isinstance(params, dict) else {}
    raw = p.get("query_tags")
    if raw is None:
        raw = p.get("tags")
    if raw is None:
        raw = node.get("tags")
    tags = tuple(sorted(set(split_tags(raw))))
    mode_raw = p.get("match_mode")
    if mode_raw is None:
        mode_raw = node.get("match_mode")
    mode = "all" if str(mode_raw or "").strip().lower() == "all" else "any"
    interval_raw = node.get("interval")
    if interval_raw is None:
        interval_raw = p.get("interval")
    return tags, mode, as_int(interval_raw, "interval")


def params_blob(node: Mapping[str, Any]) -> str:
    if node.get("node_type") == TAG_QUERY_NODE:
        tags, mode, interval = tag_query_spec(node)
        return canonical_json({"interval": interval, "match_mode": mode, "query_tags": list(tags)})
    params = params_of(node)
    if params is None:
        return "null"
    if isinstance(params, dict) and not params:
        return "{}"
    return canonical_params(params)


def dependency_ids(node: Mapping[str, Any]) -> list[str]:
    """Upstream ids: `inputs`, or `dependencies` when `inputs` is empty or missing (the SDK's
    `inputs or dependencies`); empty and null ids dropped."""
    deps = node.get("inputs") or node.get("dependencies")
    if not deps:
        return []
    if isinstance(deps, str) or not isinstance(deps, list):
        raise IdentityError("inputs", "inputs must be a list of node ids")
    out = []
    for d in deps:
        if d is None or d == "":
            continue
        if not isinstance(d, str):
            raise IdentityError("inputs", f"inputs must hold strings, got {type(d).__name__}")
        out.append(d)
    return out


def schema_compat_id(node: Mapping[str, Any]) -> str:
    value = node.get("schema_compat_id")
    text = "" if value is None else str(value).strip()
    if not text:
        alias = node.get("schema_id")
        text = "" if alias is None else str(alias).strip()
    return text


def _int_of(node: Mapping[str, Any], key: str) -> int:
    value = node.get(key)
    return value if type(value) is int else as_int(value, key)


def _sorted_inputs(node: Mapping[str, Any]) -> list[str]:
    deps = node.get("inputs") or node.get("dependencies")
    if type(deps) is list and all(type(d) is str and d for d in deps):
        return sorted(deps)  # the common case: a list of non-empty ids
    return sorted(dependency_ids(node))


def _compat_of(node: Mapping[str, Any]) -> str:
    value = node.get("schema_compat_id")
    if type(value) is str and value and not (value[0].isspace() or value[-1].isspace()):
        return value  # the common case: a clean string
    return schema_compat_id(node)


def preimage(node: Mapping[str, Any]) -> str:
    return "|".join(
        (
            str(node.get("node_type")),
            str(_int_of(node, "interval")),
            str(_int_of(node, "period")),
            params_blob(node),
            ",".join(_sorted_inputs(node)),
            _compat_of(node),
            str(node.get("code_hash")),
        )
    )


def node_id(node: Mapping[str, Any]) -> NodeId:
    """The NodeID of a node object as submitted (contract §5)."""
    return NodeId(NODE_ID_PREFIX + blake3.blake3(preimage(node).encode()).hexdigest())


def crc32(node_ids: Sequence[object]) -> int:
    """CRC-32 (zlib, start 0) of the plain concatenation of str(node_id or "") of every node
    object, in submitted order: the same value as a running CRC over each id."""
    text = "".join([nid if type(nid) is str else str(nid or "") for nid in node_ids])
    return zlib.crc32(text.encode()) & 0xFFFFFFFF


def compute_key_suffix(world_id: str, execution_domain: str, as_of: str, partition: str) -> str:
    """What follows the node id in a ComputeKey preimage (shared by every node of a diff)."""
    return UNIT_SEPARATOR + UNIT_SEPARATOR.join(
        (world_id, execution_domain or "backtest", as_of, partition)
    )


def compute_key(
    nid: str, world_id: str, execution_domain: str, as_of: str, partition: str
) -> ComputeKey:
    """BLAKE3 over the node id and its context joined by U+001F (domain already normalised)."""
    text = nid + compute_key_suffix(world_id, execution_domain, as_of, partition)
    return ComputeKey(NODE_ID_PREFIX + blake3.blake3(text.encode()).hexdigest())
