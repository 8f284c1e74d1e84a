"""A real OpenTelemetry Collector for the tests and the benchmarks: built from the Go module
proxy (hack/otel/build-otelcol.sh, cached), an OTLP/HTTP receiver on loopback and the debug
exporter printing every span and log record to the collector's log file."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from tests.conftest import ROOT, free_port

CONFIG = """receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{port}
exporters:
  debug:
    verbosity: {verbosity}
service:
  telemetry:
    metrics:
      level: none
    logs:
      sampling:
        enabled: false  # the collector's own log, which carries the debug output: print all
  pipelines:
    traces: {{receivers: [otlp], exporters: [debug]}}
    logs: {{receivers: [otlp], exporters: [debug]}}
"""


class Collector:
    def __init__(self, workdir: Path, verbosity: str = "detailed") -> None:
        build = subprocess.run(
            ["bash", str(ROOT / "hack" / "otel" / "build-otelcol.sh")],
            capture_output=True,
            text=True,
            check=False,
        )
        if build.returncode != 0:
            raise RuntimeError(f"the collector could not be built:\n{build.stderr[-3000:]}")
        port = free_port()
        config = workdir / "otelcol.yaml"
        config.write_text(CONFIG.format(port=port, verbosity=verbosity))
        self.log = workdir / "otelcol.log"
        self.endpoint = f"http://127.0.0.1:{port}"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [build.stdout.split()[-1], "--config", f"file:{config}"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.wait_for("Everything is ready")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in (out := self.output()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the collector exited:\n{out[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not received:\n{out[-3000:]}")
            time.sleep(0.1)
        return out

    def received(self) -> tuple[int, int]:
        """(spans, log records) the debug exporter reported."""
        text = self.output()
        spans = sum(int(n) for n in re.findall(r'"spans": (\d+)', text))
        records = sum(int(n) for n in re.findall(r'"log records": (\d+)', text))
        return spans, records

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
