"""ControlBus contract: what reaches the event topics is exactly contract §9, twin and Kafka."""

from __future__ import annotations

import datetime

from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.services.controlbus import ControlBus
from tests.contract.conftest import Events


async def test_queue_updated_events(events: Events) -> None:
    clock = ManualClock()
    cb = ControlBus(events.bus, clock, events.topics)
    await cb.queue_updated(["ETH", "BTC"], 60, [("btc_X_1_v1", False)], "any")
    await cb.queue_updated(
        ["BTC", "ETH"], 60, [("btc_X_1_v1", False), ("eth_Y_2_v1", False)], "any"
    )
    await cb.queue_lifecycle("old_topic", "drop", "unreferenced for 9 d")
    got = events.read(events.topics.queue)
    assert [p.key for p in got] == ["BTC,ETH", "BTC,ETH", "old_topic"]
    first, second, life = (p.value for p in got)
    for env in (first, second, life):
        assert env["specversion"] == "1.0" and env["datacontenttype"] == "application/json"
        assert env["source"] and env["id"]
        assert datetime.datetime.fromisoformat(env["time"]).timestamp() == clock.now()
        assert env["data"]["version"] == 1 and env["data"]["ts"] == env["time"]
        assert env["data"]["idempotency_key"]
    assert first["type"] == "queue_updated" and first["data"]["type"] == "QueueUpdated"
    assert first["data"]["interval"] == 60 and isinstance(first["data"]["interval"], int)
    assert first["data"]["queues"] == [{"queue": "btc_X_1_v1", "global": False}]
    assert first["data"]["etag"].startswith("q:BTC.ETH:60:")
    assert second["data"]["etag"] != first["data"]["etag"]
    assert len(second["data"]["queues"]) == 2
    assert life["type"] == "queue_lifecycle" and life["data"]["action"] == "drop"
    assert first["id"] != second["id"]


async def test_sentinel_weight_events(events: Events) -> None:
    cb = ControlBus(events.bus, ManualClock(), events.topics)
    await cb.sentinel_weight("s1-sentinel", 0.1, "v2", "w1")
    await cb.sentinel_weight("s1-sentinel", 0.5, "v2", "w1")
    got = events.read(events.topics.sentinel_weight)
    assert [p.key for p in got] == ["s1-sentinel", "s1-sentinel"]
    a, b = (p.value["data"] for p in got)
    assert got[0].value["type"] == "sentinel_weight_updated"
    assert (a["type"], a["weight"], a["sentinel_version"], a["world_id"], a["version"]) == (
        "SentinelWeightUpdated",
        0.1,
        "v2",
        "w1",
        1,
    )
    assert b["weight"] == 0.5 and a["etag"] != b["etag"]


async def test_a_big_group_set_is_delivered_whole(events: Events) -> None:
    # 60k topics of a big tag group: about 3.5 MB of JSON, beyond Kafka's default 1 MB limit
    # unless compressed
    cb = ControlBus(events.bus, ManualClock(), events.topics)
    queues = [(f"w1.live.btc_Indicator_{i:08x}_v1", False) for i in range(60_000)]
    await cb.queue_updated(["BTC"], 60, queues, "any")
    (got,) = [p for p in events.read(events.topics.queue) if p.key == "BTC"]
    assert len(got.value["data"]["queues"]) == 60_000
    assert got.value["data"]["queues"][-1] == {"queue": queues[-1][0], "global": False}
