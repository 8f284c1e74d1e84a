"""Parsing and validation of `dag_json` (contract §4) into frozen values.

`parse` accepts the full SDK node schema and raises only `InvalidDag`, whose message names the
node (id, or position when the id is unusable) and the field.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import blake3
import orjson

from qmtl_dagmanager.core import identity, native, topics
from qmtl_dagmanager.core.errors import InvalidDag
from qmtl_dagmanager.core.identity import NodeId

SCHEMA_VERSIONS = frozenset({"v1", "1", "1.0"})
SENTINEL_TYPE = "VersionSentinel"
VERSION_KEYS = ("version", "strategy_version", "build_version")
WEIGHT_KEYS = ("traffic_weight", "sentinel_weight", "weight")
_NODE_ID = re.compile(r"blake3:[0-9a-f]{64}")
MAX_TEXT = 1024  # longest accepted identity or display string (a hash, a type, a tag)


class IdMode(StrEnum):
    """What to do with submitted node ids: recompute and compare, or trust the Gateway."""

    VERIFY = "verify"
    TRUST = "trust"


@dataclass(frozen=True, slots=True)
class Limits:
    max_nodes: int = 50_000
    max_bytes: int = 64 * 1024 * 1024
    max_tags: int = 64
    max_depth: int = 64  # nesting of a node's params (or config)


class Node(NamedTuple):
    """A compute node (immutable). `raw` is the submitted object, read-only by convention,
    kept for the canonical params blob that the graph stores. A NamedTuple rather than a
    frozen dataclass: DAGs of 10k nodes are built on the Gateway's 0.1 s budget."""

    node_id: NodeId
    node_type: str
    interval: int
    period: int
    inputs: tuple[NodeId, ...]
    code_hash: str
    schema_hash: str
    schema_compat_id: str
    config_hash: str
    name: str
    tags: tuple[str, ...]
    bucket: int
    match_mode: str
    query_tags: tuple[str, ...]
    position: int  # index in the submitted `nodes` list
    raw: Mapping[str, Any]

    @property
    def digest(self) -> str:
        return self.node_id[7:]

    @property
    def is_tag_query(self) -> bool:
        return self.node_type == identity.TAG_QUERY_NODE

    def params_canon(self) -> str:
        return identity.params_blob(self.raw)


@dataclass(frozen=True, slots=True)
class Sentinel:
    """A VersionSentinel node: a version boundary with an optional traffic weight in [0, 1]."""

    node_id: NodeId
    version: str
    weight: float | None
    position: int  # index in the submitted `nodes` list


@dataclass(frozen=True, slots=True)
class Dag:
    schema_version: str
    nodes: tuple[Node, ...]  # compute nodes, submitted order, duplicates removed
    sentinels: tuple[Sentinel, ...]
    crc32: int
    version: str  # normalised version label
    topic_namespace: str | None  # from meta.topic_namespace, normalised
    meta_domain: str  # meta.execution_domain (namespace fallback)
    context_layers: tuple[Mapping[str, Any], ...]  # top-level, then meta compute_context
    order: tuple[int, ...]  # topological order as indices into `nodes`

    @property
    def by_id(self) -> dict[NodeId, Node]:
        return {n.node_id: n for n in self.nodes}


_NO_RAW: Mapping[str, Any] = {}


class NodeMemo:
    """Compute nodes already validated (and verified, if so marked), by their exact content.

    A Gateway resubmits a strategy's DAG with most nodes unchanged; validating and hashing a
    node again costs 10-20 µs, encoding and digesting it about 1.5 µs. The key is a BLAKE3
    digest of the node's orjson encoding, which tells 1, 1.0 and true apart (dict equality
    does not), so a hit is exactly an object that was checked before, under the same limits.
    An entry holds the node's checked fields, not its submitted object (a hit takes the object
    of the document being parsed, equal byte for byte): about 2 KB per node. Bounded: when
    full, the older half is dropped. Not thread-safe; one per event loop.
    """

    __slots__ = ("_limits", "_nodes", "capacity", "hits", "misses")

    def __init__(self, capacity: int = 20_000) -> None:
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._limits: Limits | None = None
        self._nodes: dict[bytes, tuple[Node, bool]] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def bind(self, limits: Limits) -> None:
        """Entries hold only under the limits they were checked with."""
        if limits != self._limits:
            self._nodes.clear()
            self._limits = limits

    def get(self, key: bytes, verify: bool, position: int, raw: Mapping[str, Any]) -> Node | None:
        """The node checked before with exactly this content, at `position` with `raw`."""
        entry = self._nodes.get(key)
        if entry is None or (verify and not entry[1]):
            self.misses += 1
            return None
        self.hits += 1
        return Node._make((*entry[0][:-2], position, raw))

    def put(self, key: bytes, node: Node, verified: bool) -> None:
        nodes = self._nodes
        if len(nodes) >= self.capacity:
            for old in list(nodes)[: max(1, len(nodes) // 2)]:
                del nodes[old]
        nodes[key] = (node._replace(raw=_NO_RAW), verified)


def _memo_key(raw: Mapping[str, Any]) -> bytes | None:
    """BLAKE3 of the node's orjson encoding: 32 bytes per entry instead of the encoding."""
    try:
        return blake3.blake3(orjson.dumps(raw)).digest()
    except orjson.JSONEncodeError:  # not plain JSON (a document built in code): no memo
        return None


def _fail(message: str, reason: str, node: str | None = None, fld: str | None = None) -> InvalidDag:
    return InvalidDag(message, reason=reason, node=node, field=fld)


def _text(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise _fail(f"longer than {MAX_TEXT} characters", "FieldTooLong", where, key)
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    raise _fail(f"expected a string, got {type(value).__name__}", "InvalidField", where, key)


def _required(obj: Mapping[str, Any], key: str, where: str) -> str:
    text = _text(obj, key, where).strip()
    if not text:
        raise _fail("required and missing or empty", "MissingField", where, key)
    return text


def _tags(value: Any, where: str, limits: Limits) -> tuple[str, ...]:
    if value is not None and not isinstance(value, list | str):
        raise _fail(
            f"expected a list of strings, got {type(value).__name__}", "InvalidField", where, "tags"
        )
    tags = identity.split_tags(value)
    if len(tags) > limits.max_tags:
        raise _fail(f"{len(tags)} tags, at most {limits.max_tags}", "TooManyTags", where, "tags")
    for t in tags:
        if len(t) > MAX_TEXT:
            raise _fail(
                f"a tag is longer than {MAX_TEXT} characters", "FieldTooLong", where, "tags"
            )
    return tuple(tags)


def _version_of(obj: Mapping[str, Any]) -> str:
    for key in VERSION_KEYS:
        value = obj.get(key)
        if value is not None and str(value).strip():
            return str(value)
    return ""


def decode(dag_json: str | bytes, limits: Limits = Limits()) -> dict[str, Any]:
    size = len(dag_json)
    if size > limits.max_bytes:
        raise _fail(
            f"dag_json is {size} bytes, the limit is {limits.max_bytes}",
            "DagTooLarge",
            fld="dag_json",
        )
    try:
        doc = orjson.loads(dag_json)
    except orjson.JSONDecodeError as e:
        raise _fail(f"malformed JSON: {e}", "InvalidJson", fld="dag_json") from None
    if not isinstance(doc, dict):
        raise _fail(
            f"expected a JSON object, got {type(doc).__name__}", "InvalidJson", fld="dag_json"
        )
    return doc


def parse(
    dag_json: str | bytes,
    *,
    limits: Limits = Limits(),
    ids: IdMode = IdMode.VERIFY,
    memo: NodeMemo | None = None,
) -> Dag:
    """Decode and validate a DAG; raise `InvalidDag` naming the node and field on failure.
    With a `memo`, nodes checked before are taken from it and new ones are added."""
    return from_document(decode(dag_json, limits), limits=limits, ids=ids, memo=memo)


def from_document(
    doc: Mapping[str, Any],
    *,
    limits: Limits = Limits(),
    ids: IdMode = IdMode.VERIFY,
    memo: NodeMemo | None = None,
) -> Dag:
    schema_version = doc.get("schema_version", "v1")
    if str(schema_version).strip() not in SCHEMA_VERSIONS:
        raise _fail(
            f"unsupported schema_version {schema_version!r} (supported: v1, 1, 1.0)",
            "UnsupportedSchemaVersion",
            fld="schema_version",
        )
    raw_nodes = doc.get("nodes")
    if not isinstance(raw_nodes, list):
        raise _fail("required: a list of node objects", "MissingField", fld="nodes")
    if len(raw_nodes) > limits.max_nodes:
        raise _fail(
            f"{len(raw_nodes)} nodes, the limit is {limits.max_nodes}", "DagTooLarge", fld="nodes"
        )
    meta = doc.get("meta")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise _fail("expected an object", "InvalidField", fld="meta")

    if memo is not None:
        memo.bind(limits)
    nodes, sentinels, known, submitted_ids, order = _read_nodes(raw_nodes, ids, limits, memo)
    for n in nodes if order is None else ():  # with an order, every input is a known id
        for dep in n.inputs:
            if type(dep) is not str:
                raise _fail(
                    f"expected node id strings, got {type(dep).__name__}",
                    "InvalidField",
                    n.node_id,
                    "inputs",
                )
            if dep not in known:
                raise _fail(
                    f"names {dep}, which is not in the DAG", "UnknownInput", n.node_id, "inputs"
                )

    version_label = (
        (sentinels[0].version if sentinels else "") or _version_of(doc) or _version_of(meta)
    )
    if len(version_label) > 128:
        raise _fail("version label longer than 128 characters", "FieldTooLong", fld="version")
    try:
        ns = topics.namespace_from_meta(meta.get("topic_namespace"))
    except topics.NamespaceError as e:
        raise _fail(str(e), "InvalidField", fld="meta.topic_namespace") from None
    layers = tuple(
        layer
        for layer in (doc.get("compute_context"), meta.get("compute_context"))
        if isinstance(layer, dict)
    )
    return Dag(
        schema_version=str(schema_version),
        nodes=tuple(nodes),
        sentinels=tuple(sentinels),
        crc32=identity.crc32(submitted_ids),
        version=topics.normalize_version(version_label),
        topic_namespace=ns,
        meta_domain=str(meta.get("execution_domain") or ""),
        context_layers=layers,
        order=topological_order(nodes) if order is None else tuple(order),
    )


def _read_nodes(
    raw_nodes: list[Any], ids: IdMode, limits: Limits, memo: NodeMemo | None
) -> tuple[list[Node], list[Sentinel], Collection[str], list[object], list[int] | None]:
    """(compute nodes, sentinels, every node id, the submitted ids in order, and the
    topological order when the native extension found it). The extension reads the nodes of
    the common shape; Python reads the rest and raises."""
    verify = ids is IdMode.VERIFY
    fast = native.read_nodes(raw_nodes, verify, limits.max_tags, limits.max_depth, MAX_TEXT, Node)
    if fast is not None and fast[1] == 0:  # every node read natively, no duplicate ids
        nodes: list[Node] = fast[0]
        submitted = [n.node_id for n in nodes]
        return nodes, [], set(submitted), list(submitted), fast[2]
    nodes = []
    sentinels: list[Sentinel] = []
    seen: dict[str, Mapping[str, Any]] = {}
    submitted_ids: list[object] = []
    read = fast[0] if fast is not None else None
    for index, raw in enumerate(raw_nodes):
        pre = None if read is None else read[index]
        if pre is not None:
            nodes.append(pre)
            seen[pre.node_id] = raw
            submitted_ids.append(pre.node_id)
            continue
        _read_one(raw, index, verify, limits, memo, (nodes, sentinels, seen, submitted_ids))
    return nodes, sentinels, seen.keys(), submitted_ids, None


_Into = tuple[list[Node], list[Sentinel], dict[str, Mapping[str, Any]], list[object]]


def _read_one(
    raw: Any, index: int, verify: bool, limits: Limits, memo: NodeMemo | None, into: _Into
) -> None:
    """Read one submitted node in Python into (nodes, sentinels, seen, submitted ids)."""
    nodes, sentinels, seen, submitted_ids = into
    if not isinstance(raw, dict):
        submitted_ids.append(None)
        raise _fail(f"expected an object, got {type(raw).__name__}", "InvalidField", f"#{index}")
    nid_raw = raw.get("node_id")
    submitted_ids.append(nid_raw)
    where = nid_raw if isinstance(nid_raw, str) and len(nid_raw) < 100 else f"#{index}"
    if not isinstance(nid_raw, str) or not _NODE_ID.fullmatch(nid_raw):
        raise _fail(
            "must be 'blake3:' followed by 64 lowercase hex digits",
            "InvalidNodeId",
            where,
            "node_id",
        )
    nid = NodeId(nid_raw)
    previous = seen.get(nid)
    if previous is not None:
        if previous != raw:
            raise _fail("appears twice with different content", "DuplicateNode", where)
        return
    seen[nid] = raw
    key = None if memo is None else _memo_key(raw)
    if key is not None and memo is not None:
        hit = memo.get(key, verify, index, raw)
        if hit is not None:
            nodes.append(hit)
            return
    node_type = raw.get("node_type")
    if type(node_type) is not str or not node_type or len(node_type) > MAX_TEXT:
        node_type = _required(raw, "node_type", where)
    if node_type == SENTINEL_TYPE:
        sentinels.append(_sentinel(raw, nid, index, where))
        return
    node = _node(raw, nid, node_type, index, where, verify, limits)
    nodes.append(node)
    if key is not None and memo is not None:
        memo.put(key, node, verify)


def _sentinel(raw: Mapping[str, Any], nid: NodeId, index: int, where: str) -> Sentinel:
    weight: float | None = None
    for key in WEIGHT_KEYS:
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise _fail(f"must be a number in [0, 1], got {value!r}", "InvalidWeight", where, key)
        weight = float(value)
        break
    return Sentinel(nid, _version_of(raw), weight, index)


def _hash_field(raw: Mapping[str, Any], key: str, where: str) -> str:
    value = raw.get(key)
    if type(value) is str and 0 < len(value) <= MAX_TEXT and not value[0].isspace():
        return value  # the common case, checked without a call
    return _required(raw, key, where)


def _int_field(raw: Mapping[str, Any], key: str, where: str) -> int:
    value = raw.get(key)
    if type(value) is int:
        result = value
    else:
        try:
            result = identity.as_int(value, key)
        except identity.IdentityError as e:
            raise _fail(str(e), "InvalidField", where, key) from None
    if result < 0:
        raise _fail("must not be negative", "InvalidField", where, key)
    return result


def _inputs(raw: Mapping[str, Any], where: str) -> tuple[NodeId, ...]:
    deps = raw.get("inputs") or raw.get("dependencies")
    if type(deps) is list and None not in deps and "" not in deps:
        return tuple(deps)  # the common case; element types are checked with the inputs
    try:
        return tuple(NodeId(d) for d in identity.dependency_ids(raw))
    except identity.IdentityError as e:
        raise _fail(str(e), "InvalidField", where, e.field) from None


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether a JSON value nests more than `limit` levels (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return False


def _node(
    raw: Mapping[str, Any],
    nid: NodeId,
    node_type: str,
    index: int,
    where: str,
    verify: bool,
    limits: Limits,
) -> Node:
    code_hash = _hash_field(raw, "code_hash", where)
    schema_hash = _hash_field(raw, "schema_hash", where)
    compat = raw.get("schema_compat_id")
    alias = raw.get("schema_id")
    if type(compat) is not str or alias is not None or not compat or len(compat) > MAX_TEXT:
        compat = _text(raw, "schema_compat_id", where).strip()
        alias_text = _text(raw, "schema_id", where).strip()
        if compat and alias_text and compat != alias_text:
            raise _fail(
                f"schema_compat_id {compat!r} and its alias schema_id {alias_text!r} differ",
                "SchemaIdConflict",
                where,
                "schema_compat_id",
            )
        compat = compat or alias_text
        if not compat:
            raise _fail(
                "required and missing or empty (schema_id is accepted as an alias)",
                "MissingField",
                where,
                "schema_compat_id",
            )
    for key in ("params", "config"):
        value = raw.get(key)
        if isinstance(value, dict | list) and _deeper_than(value, limits.max_depth):
            raise _fail(f"nested deeper than {limits.max_depth} levels", "FieldTooDeep", where, key)
    interval = _int_field(raw, "interval", where)
    period = _int_field(raw, "period", where)
    bucket = _int_field(raw, "bucket", where)
    inputs = _inputs(raw, where)
    tags_raw = raw.get("tags")
    if (
        type(tags_raw) is list
        and len(tags_raw) <= limits.max_tags
        and all(type(t) is str and t and len(t) <= MAX_TEXT and t == t.strip() for t in tags_raw)
    ):
        tags = tuple(tags_raw)
    else:
        tags = _tags(tags_raw, where, limits)
    query_tags: tuple[str, ...] = ()
    match_mode = "any"
    if node_type == identity.TAG_QUERY_NODE:
        try:
            query_tags, match_mode, q_interval = identity.tag_query_spec(raw)
        except identity.IdentityError as e:
            raise _fail(str(e), "InvalidField", where, e.field) from None
        if not query_tags:
            raise _fail(
                "a TagQueryNode needs query tags (params.query_tags, params.tags or tags)",
                "InvalidTagQuery",
                where,
                "tags",
            )
        if q_interval <= 0:
            raise _fail(
                "a TagQueryNode needs a positive interval", "InvalidTagQuery", where, "interval"
            )
        interval = q_interval
    if verify:
        try:
            expected = identity.node_id(raw)
        except (identity.IdentityError, TypeError, ValueError, RecursionError) as e:
            raise _fail(
                f"cannot compute the NodeID: {e}", "InvalidField", where, "params"
            ) from None
        if expected != nid:
            raise _fail(
                f"does not match its contents (expected {expected})",
                "NodeIdMismatch",
                where,
                "node_id",
            )
    name = raw.get("name")
    config_hash = raw.get("config_hash")
    return Node(
        nid,
        node_type,
        interval,
        period,
        inputs,
        code_hash,
        schema_hash,
        compat,
        config_hash if type(config_hash) is str else _text(raw, "config_hash", where),
        name if type(name) is str and len(name) <= MAX_TEXT else _text(raw, "name", where),
        tags,
        bucket,
        match_mode,
        query_tags,
        index,
        raw,
    )


def topological_order(nodes: list[Node] | tuple[Node, ...]) -> tuple[int, ...]:
    """Kahn's algorithm in O(N + E); inputs that are not compute nodes (a sentinel) are
    ignored. A cycle raises `InvalidDag` listing the cycle's node ids in order."""
    position = {n.node_id: i for i, n in enumerate(nodes)}
    indegree = [0] * len(nodes)
    children: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        for dep in n.inputs:
            j = position.get(dep)
            if j is not None:
                indegree[i] += 1
                children[j].append(i)
    ready = [i for i, d in enumerate(indegree) if d == 0]
    order: list[int] = []
    while ready:
        i = ready.pop()
        order.append(i)
        for c in children[i]:
            indegree[c] -= 1
            if indegree[c] == 0:
                ready.append(c)
    if len(order) != len(nodes):
        cycle = _find_cycle(nodes, position, indegree)
        raise _fail(" -> ".join(cycle), "Cycle", cycle[0], "inputs")
    return tuple(order)


def _find_cycle(
    nodes: list[Node] | tuple[Node, ...], position: dict[NodeId, int], indegree: list[int]
) -> list[str]:
    """Walk upstream from a node left in the cycle-carrying remainder until a node repeats."""
    start = next(i for i, d in enumerate(indegree) if d > 0)
    path: list[int] = []
    on_path: dict[int, int] = {}
    i = start
    while i not in on_path:
        on_path[i] = len(path)
        path.append(i)
        i = next(
            position[d] for d in nodes[i].inputs if d in position and indegree[position[d]] > 0
        )
    cycle = path[on_path[i] :]
    cycle.reverse()  # upstream walk → report in data-flow order
    ids = [nodes[k].node_id for k in cycle]
    return [*ids, ids[0]]
