"""Shared by the benchmarks: the local stack's endpoints and a free port."""

from __future__ import annotations

import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stack_env() -> dict[str, str]:
    """The environment, completed with `.stack/env` (written by `make stack-up`)."""
    out = dict(os.environ)
    path = ROOT / ".stack" / "env"
    if path.exists() and "NEO4J_URI" not in out:
        for line in path.read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            out[key] = value
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
