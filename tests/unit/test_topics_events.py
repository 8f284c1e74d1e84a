"""Topic naming, versions and ControlBus payloads."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from qmtl_dagmanager.core import events, topics


def test_version_normalisation() -> None:
    assert topics.normalize_version(" release/1.2 ") == "release-1.2"
    assert topics.normalize_version("--v2__") == "v2"
    assert topics.normalize_version("") == "v1"
    assert topics.normalize_version(None) == "v1"
    assert topics.normalize_version("!!!") == "v1"


def test_asset_from_first_non_empty_tag() -> None:
    d = "ab" * 32
    assert topics.topic_name(("", "BTC/USD"), "N", d, "v1", None) == "btcusd_N_abababab_v1"
    assert topics.topic_name((), "N", d, "v1", "w.live") == "w.live.asset_N_abababab_v1"
    assert topics.topic_name(("€",), "N", d, "v1", None) == "asset_N_abababab_v1"


@given(
    st.lists(st.text(max_size=300), max_size=3),
    st.text(max_size=300),
    st.sampled_from([None, "w1.live", "a" * 100 + ".live"]),
    st.integers(8, 64),
)
def test_topic_names_are_always_valid_kafka_names(
    tags: list[str], node_type: str, ns: str | None, hash_len: int
) -> None:
    version = topics.normalize_version(node_type[:128])
    name = topics.topic_name(tuple(tags), node_type, "f" * 64, version, ns, hash_len)
    assert topics.VALID_TOPIC.match(name), name
    assert ("f" * hash_len) in name


def test_queue_updated_etag_changes_with_content() -> None:
    key, a = events.queue_updated(["ETH", "BTC"], 60, [("t1", False)], "any")
    assert key == "BTC,ETH" and a["tags"] == ["BTC", "ETH"] and a["version"] == 1
    assert a["queues"] == [{"queue": "t1", "global": False}]
    assert a["etag"].startswith("q:BTC.ETH:60:")
    _, same = events.queue_updated(["BTC", "ETH"], 60, [("t1", False)], "any")
    _, more = events.queue_updated(["BTC", "ETH"], 60, [("t1", False), ("t2", False)], "any")
    _, mode = events.queue_updated(["BTC", "ETH"], 60, [("t1", False)], "all")
    assert same["etag"] == a["etag"]
    assert len({a["etag"], more["etag"], mode["etag"]}) == 3


def test_sentinel_weight_and_envelope() -> None:
    key, data = events.sentinel_weight("s-sentinel", 0.25, "v2", "w1")
    assert key == "s-sentinel" and data["weight"] == 0.25 and data["version"] == 1
    _, other = events.sentinel_weight("s-sentinel", 0.5, "v2", "w1")
    assert other["etag"] != data["etag"]
    env = events.cloud_event(
        "sentinel_weight_updated",
        data,
        event_id="e1",
        time_iso="2026-01-01T00:00:00Z",
        source="qmtl/dagmanager",
    )
    assert env["specversion"] == "1.0" and env["data"]["ts"] == "2026-01-01T00:00:00Z"
    assert env["data"]["idempotency_key"]


def test_catalog_spec_for_a_recorded_tag() -> None:
    catalog = topics.TopicCatalog()
    for kind in topics.TopicType:
        assert catalog.spec_for_tag(kind.value) == catalog.specs[kind]
    assert catalog.spec_for_tag("") == catalog.specs[topics.TopicType.INDICATOR]
