"""OpenTelemetry export over OTLP/HTTP with JSON bodies (`/v1/traces`, `/v1/logs`), from a
background thread: spans (the `SpanSink` of `tracing.Tracer`) and log records (the audit
logger's, through `OtlpLogHandler`). Nothing waits on the collector: records are queued
(bounded; beyond the bound they are dropped and counted) and sent in batches every
`interval` seconds or `batch` records. A batch the collector refuses or cannot take is
logged once per failure streak and dropped: tracing never slows or fails a diff."""

from __future__ import annotations

import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import orjson

from qmtl_dagmanager.tracing import Attribute, Span, current

log = logging.getLogger(__name__)
SEVERITY = {"DEBUG": 5, "INFO": 9, "WARNING": 13, "ERROR": 17, "CRITICAL": 21}
# LogRecord attributes that are not extras
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _value(v: Attribute) -> dict[str, Any]:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    return {"stringValue": str(v)}


def _attributes(attrs: Mapping[str, Attribute]) -> list[dict[str, Any]]:
    return [{"key": k, "value": _value(v)} for k, v in attrs.items()]


def span_json(s: Span) -> dict[str, Any]:
    out: dict[str, Any] = {
        "traceId": s.trace_id,
        "spanId": s.span_id,
        "name": s.name,
        "kind": 1,  # internal
        "startTimeUnixNano": str(s.start_ns),
        "endTimeUnixNano": str(s.end_ns),
        "attributes": _attributes(s.attributes),
        "status": {"code": 2, "message": s.error} if s.error else {"code": 1},
    }
    if s.parent_id:
        out["parentSpanId"] = s.parent_id
    return out


class OtlpExporter:
    def __init__(
        self,
        endpoint: str,
        service: str = "qmtl-dagmanager",
        *,
        resource: Mapping[str, Attribute] | None = None,
        interval: float = 1.0,
        batch: int = 512,
        capacity: int = 20_000,
        timeout: float = 5.0,
    ) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"otlp_endpoint {endpoint!r}: must start with http:// or https://")
        self.endpoint = endpoint.rstrip("/")
        self._resource = {"attributes": _attributes({"service.name": service, **(resource or {})})}
        self._interval, self._batch, self._timeout = interval, batch, timeout
        self._spans: queue.Queue[Span] = queue.Queue(capacity)
        self._logs: queue.Queue[dict[str, Any]] = queue.Queue(capacity)
        self.dropped = 0
        self.sent = {"traces": 0, "logs": 0}
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    # -- intake (any thread, never blocks) --------------------------------------------------

    def add(self, span: Span) -> None:
        try:
            self._spans.put_nowait(span)
        except queue.Full:
            self.dropped += 1

    def log(self, record: dict[str, Any]) -> None:
        try:
            self._logs.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (bounded by `timeout`), then stop the thread."""
        self._stop.set()
        self._thread.join(timeout)
        log.log(
            logging.WARNING if self.dropped else logging.INFO,
            "OTLP export to %s: %d spans and %d log records sent, %d dropped",
            self.endpoint, self.sent["traces"], self.sent["logs"], self.dropped,
        )  # fmt: skip

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._drain()
        self._drain()

    def _drain(self) -> None:
        while True:
            spans = _take(self._spans, self._batch)
            logs = _take(self._logs, self._batch)
            if not spans and not logs:
                return
            if spans:
                self._post("traces", self._traces_body(spans), len(spans))
            if logs:
                self._post("logs", self._logs_body(logs), len(logs))

    def _traces_body(self, spans: list[Span]) -> dict[str, Any]:
        scope = {"scope": {"name": "qmtl_dagmanager"}, "spans": [span_json(s) for s in spans]}
        return {"resourceSpans": [{"resource": self._resource, "scopeSpans": [scope]}]}

    def _logs_body(self, logs: list[dict[str, Any]]) -> dict[str, Any]:
        scopes: dict[str, list[dict[str, Any]]] = {}
        for r in logs:
            scopes.setdefault(r.pop("_scope"), []).append(r)
        return {
            "resourceLogs": [
                {
                    "resource": self._resource,
                    "scopeLogs": [
                        {"scope": {"name": name}, "logRecords": records}
                        for name, records in scopes.items()
                    ],
                }
            ]
        }

    def _post(self, signal: str, body: dict[str, Any], count: int) -> None:
        req = urllib.request.Request(  # noqa: S310 - the scheme is checked in __init__
            f"{self.endpoint}/v1/{signal}",
            data=orjson.dumps(body),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as resp:  # noqa: S310
                resp.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            self.dropped += count
            if not self._failing:
                log.warning("OTLP export to %s failed (%d %s dropped): %s",
                            self.endpoint, count, signal, e)  # fmt: skip
            self._failing = True
            return
        if self._failing:
            log.info("OTLP export to %s works again", self.endpoint)
        self._failing = False
        self.sent[signal] += count


def _take(q: queue.Queue[Any], limit: int) -> list[Any]:
    out: list[Any] = []
    while len(out) < limit:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            break
    return out


class OtlpLogHandler(logging.Handler):
    """Log records as OTLP log records: the message as body, the extras as attributes, and
    the trace and span of the span open where the record was made."""

    def __init__(self, exporter: OtlpExporter) -> None:
        super().__init__()
        self._exporter = exporter

    def emit(self, record: logging.LogRecord) -> None:
        try:
            attrs: dict[str, Attribute] = {}
            for k, v in record.__dict__.items():
                if k in _STANDARD or k.startswith("_"):
                    continue
                attrs[k] = v if isinstance(v, str | int | float | bool) else str(v)
            ns = int(record.created * 1e9)
            out: dict[str, Any] = {
                "_scope": record.name,
                "timeUnixNano": str(ns),
                "observedTimeUnixNano": str(time.time_ns()),
                "severityNumber": SEVERITY.get(record.levelname, 9),
                "severityText": record.levelname,
                "body": {"stringValue": record.getMessage()},
                "attributes": _attributes(attrs),
            }
            span = current()
            if span is not None:
                out["traceId"], out["spanId"] = span.trace_id, span.span_id
            self._exporter.log(out)
        except Exception:  # noqa: BLE001 - a log handler must never raise into the caller
            self.handleError(record)
