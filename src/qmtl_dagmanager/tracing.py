"""Spans for traces: a small tracer over `contextvars`, so a span opened in a coroutine is the
parent of the spans its awaits open (tasks copy the context). Finished spans go to a
`SpanSink` (the OTLP exporter, `adapters/otlp.py`); without one, `span()` hands out a shared
no-op span and costs one attribute check.

Ids follow W3C Trace Context: 16-byte trace ids and 8-byte span ids, hex. A span that raises
records the error (its status) and re-raises."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

Attribute = str | int | float | bool


@dataclass(slots=True)
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    attributes: dict[str, Attribute] = field(default_factory=dict)
    end_ns: int = 0
    error: str = ""  # set when the span's block raised

    def set(self, key: str, value: Attribute) -> None:
        self.attributes[key] = value


class _NoSpan:
    """The span of a disabled tracer: takes attributes and keeps none."""

    trace_id = span_id = ""

    def set(self, key: str, value: Attribute) -> None:
        return None


NO_SPAN = _NoSpan()
_current: ContextVar[Span | None] = ContextVar("qmtl_dagmanager_span", default=None)


class SpanSink(Protocol):
    def add(self, span: Span) -> None:
        """Take a finished span (never blocks; may drop under back-pressure)."""
        ...


def current() -> Span | None:
    """The innermost open span of this context (for log records: their trace and span)."""
    return _current.get()


def _new_id(nbytes: int) -> str:
    return os.urandom(nbytes).hex()


class Tracer:
    def __init__(self, sink: SpanSink | None = None) -> None:
        self._sink = sink

    @property
    def enabled(self) -> bool:
        return self._sink is not None

    @contextlib.contextmanager
    def span(
        self, name: str, attributes: Mapping[str, Attribute] | None = None
    ) -> Iterator[Span | _NoSpan]:
        """A child of the current span (a new trace when there is none)."""
        sink = self._sink
        if sink is None:
            yield NO_SPAN
            return
        parent = _current.get()
        span = Span(
            name,
            parent.trace_id if parent is not None else _new_id(16),
            _new_id(8),
            parent.span_id if parent is not None else "",
            time.time_ns(),
            dict(attributes or {}),
        )
        token = _current.set(span)
        try:
            yield span
        except BaseException as e:
            span.error = f"{type(e).__name__}: {e}"[:500]
            raise
        finally:
            span.end_ns = time.time_ns()
            _current.reset(token)
            sink.add(span)
