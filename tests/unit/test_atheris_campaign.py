"""A short coverage-guided campaign on the DAG parser (the long one: `make fuzz`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# a minute of CPU: run in the stack stage of `make test`, not the fast one
pytestmark = pytest.mark.campaign

ROOT = Path(__file__).resolve().parents[2]


def test_thirty_thousand_inputs_without_a_crash(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(ROOT / "tests" / "data" / "sample-dag.json", corpus)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz" / "dag_parser.py"), "-runs=30000",
         "-max_total_time=120", str(corpus)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DONE" in proc.stderr and "cov:" in proc.stderr
