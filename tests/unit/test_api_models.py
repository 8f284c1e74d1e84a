"""The typed CRD models: one declaration gives the schema, the parser and the errors."""

from __future__ import annotations

from typing import Any

import pytest

from qmtl_dagmanager.api import fields
from qmtl_dagmanager.api.v1alpha1 import strategydag, versionsentinel
from qmtl_dagmanager.core import canary, dag, plan, sentinel_status, strategy_status
from qmtl_dagmanager.core.errors import InvalidSpec, Unavailable
from qmtl_dagmanager.core.strategy_spec import DeletionPolicy
from qmtl_dagmanager.core.topics import TopicCatalog
from tests.unit.dags import chain, encode

STEPS = [{"weight": 10, "pause": "30s"}, {"weight": 100}]


def sentinel(**spec: Any) -> dict[str, Any]:
    return {"strategyId": "s", "version": "v2", "steps": STEPS, **spec}


def test_strategy_spec_reads_every_field() -> None:
    s = strategydag.parse_spec(
        {
            "strategyId": "alpha",
            "dag": {"schemaVersion": "1", "nodes": [{"node_id": "x"}], "meta": {"a": 1}},
            "worldId": "w",
            "executionDomain": "live",
            "asOf": "2026-01-01",
            "partition": "p",
            "version": "v3",
            "deletionPolicy": "Retain",
            "paused": True,
            "dryRun": True,
        }
    )
    assert s.strategy_id == "alpha"
    assert s.dag == {"schemaVersion": "1", "nodes": [{"node_id": "x"}], "meta": {"a": 1}}
    assert s.config_map is None
    assert (s.world_id, s.execution_domain, s.as_of, s.partition, s.version) == (
        "w",
        "live",
        "2026-01-01",
        "p",
        "v3",
    )
    assert s.deletion_policy is DeletionPolicy.RETAIN
    assert s.paused and s.dry_run


def test_strategy_spec_defaults_and_config_map() -> None:
    s = strategydag.parse_spec({"strategyId": "a", "dagConfigMapRef": {"name": "cm", "key": "k"}})
    assert s.config_map == ("cm", "k")
    assert s.dag is None
    assert s.deletion_policy is DeletionPolicy.DELETE
    assert not s.paused and not s.dry_run


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"dag": {}}, r"spec\.strategyId: is required"),
        ({"strategyId": "", "dag": {}}, r"spec\.strategyId: must be at least 1"),
        ({"strategyId": 7, "dag": {}}, r"spec\.strategyId: expected a string"),
        ({"strategyId": "a"}, "exactly one of dag and dagConfigMapRef"),
        (
            {"strategyId": "a", "dag": {}, "dagConfigMapRef": {"name": "c", "key": "k"}},
            "exactly one",
        ),
        ({"strategyId": "a", "dag": {}, "deletionPolicy": "Keep"}, r"deletionPolicy: 'Keep'"),
        ({"strategyId": "a", "dag": {"nodes": {}}}, r"spec\.dag\.nodes: expected a list"),
        ({"strategyId": "a", "dag": {"nodes": [3]}}, r"spec\.dag\.nodes\[0\]: expected an"),
        ({"strategyId": "a", "dag": {"schemaVersion": "9"}}, r"schemaVersion: '9' is not one"),
        ({"strategyId": "a", "dagConfigMapRef": {"name": "c"}}, r"dagConfigMapRef\.key: is req"),
        ({"strategyId": "a", "dag": {}, "paused": "yes"}, r"spec\.paused: expected true or"),
    ],
)
def test_bad_strategy_specs_name_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        strategydag.parse_spec(spec)


def test_sentinel_spec_reads_steps_gates_and_window() -> None:
    s = versionsentinel.parse_spec(
        sentinel(
            steps=[{"weight": 10, "pause": "1h30m"}, {"weight": 50, "pause": "indefinite"}],
            analysis=[
                {"name": "err", "query": "q", "threshold": 1, "interval": 5},
                {"name": "lat", "query": "q2", "threshold": 0.5, "pass": "above"},
            ],
            rollbackWindow="5m",
            stableVersion="v1",
            strategyRef={"name": "alpha"},
        )
    )
    assert [(st.weight, st.pause) for st in s.rollout.steps] == [(10, 5400.0), (50, None)]
    err, lat = s.rollout.gates
    assert (err.name, err.threshold, err.below, err.interval) == ("err", 1.0, True, 5.0)
    assert (lat.below, lat.interval, lat.failure_limit) == (False, 30.0, 0)
    assert s.rollout.rollback_window == 300.0
    assert (s.stable_version, s.strategy_ref) == ("v1", "alpha")


@pytest.mark.parametrize("value", ["5 minutes", "-3", "1d", True, "", "s"])
def test_bad_durations_name_the_field(value: object) -> None:
    with pytest.raises(InvalidSpec, match=r"spec\.steps\[0\]\.pause"):
        versionsentinel.parse_spec(sentinel(steps=[{"weight": 5, "pause": value}]))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (sentinel(steps=[{"weight": 5}, {"weight": 101}]), r"spec\.steps\[1\]\.weight: 101"),
        (sentinel(steps=[{"weight": True}]), r"spec\.steps\[0\]\.weight: True is not an int"),
        (sentinel(steps=[]), r"spec\.steps: needs at least 1"),
        (sentinel(steps=[{"weight": 1}] * 51), r"spec\.steps: has more than 50"),
        (
            sentinel(analysis=[{"name": "a", "query": "q", "threshold": 1}] * 2),
            r"spec\.analysis\[1\]\.name: 'a' is used twice",
        ),
        (
            sentinel(analysis=[{"name": "a", "query": "q", "threshold": "high"}]),
            r"spec\.analysis\[0\]\.threshold: 'high' is not a number",
        ),
        (
            sentinel(analysis=[{"name": "a", "query": "q", "threshold": 1, "pass": "equal"}]),
            r"spec\.analysis\[0\]\.pass: 'equal' is not one of below, above",
        ),
        (
            sentinel(analysis=[{"name": "a", "query": "q", "threshold": 1, "interval": "0.5s"}]),
            r"spec\.analysis\[0\]\.interval: at least 1s",
        ),
        (sentinel(stableVersion="v2"), r"spec\.stableVersion: 'v2' is the canary's own"),
        (sentinel(prometheusUrl="ftp://x"), r"spec\.prometheusUrl: 'ftp://x'"),
        (sentinel(version=" "), r"spec\.version: is required"),
        ({"strategyId": "s", "version": "v"}, r"spec\.steps: is required"),
    ],
)
def test_bad_sentinel_specs_name_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        versionsentinel.parse_spec(spec)


def test_schema_comes_from_the_same_declaration() -> None:
    spec = strategydag.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    props = spec["spec"]["properties"]
    assert spec["spec"]["required"] == ["strategyId"]
    assert props["deletionPolicy"]["enum"] == ["Delete", "Retain"]
    assert props["deletionPolicy"]["default"] == "Delete"
    assert props["strategyId"]["maxLength"] == 253
    assert props["dag"]["properties"]["nodes"]["items"]["x-kubernetes-preserve-unknown-fields"]
    vs = versionsentinel.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    steps = vs["spec"]["properties"]["steps"]
    assert steps["maxItems"] == canary.MAX_STEPS == 50
    assert steps["items"]["required"] == ["weight"]
    assert steps["items"]["properties"]["pause"] == {
        "x-kubernetes-int-or-string": True,
        "description": steps["items"]["properties"]["pause"]["description"],
    }
    assert vs["spec"]["properties"]["analysis"]["items"]["properties"]["pass"]["default"] == "below"


def test_every_status_key_the_operator_writes_is_declared() -> None:
    """The API server prunes undeclared status fields without an error: the renderers may
    only write what the models declare."""
    d = dag.parse(encode(chain(3)))
    p = plan.plan(d, plan.Request("s1"), {}, {}, TopicCatalog())
    ready = strategy_status.for_plan(None, p, False, "t1", 4, "alpha")
    written = [
        ready,
        strategy_status.for_plan(None, p, True, "t1", 4, "alpha"),
        strategy_status.for_error(ready, Unavailable("Kafka is down"), "t2", 5),
        strategy_status.for_error(None, InvalidSpec("spec.dag: bad"), "t2", 5),
        strategy_status.paused(ready, 6),
    ]
    for status in written:
        assert fields.unknown(strategydag.Status, status) == []
        fields.parse(strategydag.Status, status, "status")
    state = canary.State(phase=canary.Phase.PROGRESSING, step=0, weight=10, step_started=5.0)
    for error in (None, ("Unavailable", "Prometheus is down")):
        vs = sentinel_status.render(
            None,
            state,
            generation=1,
            sentinel_id="s-sentinel",
            transitions=[],
            now=10.0,
            last_action="promote",
            held_by=None,
            aborted_by=None,
            error=error,
        )
        assert fields.unknown(versionsentinel.Status, vs) == []
        fields.parse(versionsentinel.Status, vs, "status")
    assert fields.unknown(strategydag.Status, {"nodes": {"total": 1, "gone": 2}, "x": 1}) == [
        "nodes.gone",
        "x",
    ]


def test_json_names_are_camel_case_unless_named() -> None:
    names = [fields.json_name(f) for f in versionsentinel.Gate.__dataclass_fields__.values()]
    assert names == ["name", "query", "threshold", "pass", "interval", "failureLimit"]
