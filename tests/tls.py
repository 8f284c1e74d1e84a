"""Throwaway certificates for TLS tests, made with the openssl command line."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _run(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def ca(dir: Path, name: str) -> tuple[Path, Path]:
    key, crt = dir / f"{name}.key", dir / f"{name}.crt"
    _run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        str(key),
        "-out",
        str(crt),
    )
    return crt, key


def leaf(dir: Path, name: str, signer: tuple[Path, Path], *, server: bool) -> tuple[Path, Path]:
    key, csr, crt = dir / f"{name}.key", dir / f"{name}.csr", dir / f"{name}.crt"
    ext = dir / f"{name}.ext"
    usage = "serverAuth" if server else "clientAuth"
    ext.write_text(f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n")
    _run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    _run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(signer[0]),
        "-CAkey",
        str(signer[1]),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(crt),
    )
    return crt, key
