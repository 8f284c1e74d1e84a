"""Just enough of the Kafka protocol, in the standard library, for the local stack to probe a
secured broker and give principals their ACLs: TLS, SASL/SCRAM-SHA-512 login, Metadata v4 and
CreateAcls v1 (all non-flexible versions Kafka 4 still serves)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import socket
import ssl
import struct
from dataclasses import dataclass

CLIENT_ID = b"qmtl-stack"
# enum values of the Kafka protocol
TOPIC, GROUP, CLUSTER = 2, 3, 4
LITERAL, PREFIXED = 3, 4
OPERATIONS = {
    "READ": 3,
    "WRITE": 4,
    "CREATE": 5,
    "DELETE": 6,
    "ALTER": 7,
    "DESCRIBE": 8,
    "CLUSTER_ACTION": 9,
    "DESCRIBE_CONFIGS": 10,
    "ALTER_CONFIGS": 11,
    "IDEMPOTENT_WRITE": 12,
}
ALLOW = 3


class WireError(ValueError):
    pass


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">h", len(b)) + b


def recv(s: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes from the socket."""
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise WireError("the connection was closed by the server")
        buf += chunk
    return bytes(buf)


class Conn:
    """One TLS connection, logged in with SCRAM-SHA-512."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._corr = 0

    def call(self, api: int, version: int, body: bytes) -> bytes:
        self._corr += 1
        head = struct.pack(">hhi", api, version, self._corr) + _str(CLIENT_ID)
        msg = head + body
        self.sock.sendall(struct.pack(">i", len(msg)) + msg)
        size = struct.unpack(">i", recv(self.sock, 4))[0]
        data = recv(self.sock, size)
        (corr,) = struct.unpack_from(">i", data, 0)
        if corr != self._corr:
            raise WireError(f"unexpected correlation id {corr}")
        return data[4:]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def connect(
    port: int, user: str, password: str, ca: str, host: str = "127.0.0.1", timeout: float = 3.0
) -> Conn:
    ctx = ssl.create_default_context(cafile=ca)
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        conn = Conn(ctx.wrap_socket(raw, server_hostname=host))
        _scram(conn, user, password)
    except BaseException:
        raw.close()
        raise
    return conn


def _authenticate(conn: Conn, payload: bytes) -> bytes:
    data = conn.call(36, 1, struct.pack(">i", len(payload)) + payload)
    (err, mlen) = struct.unpack_from(">hh", data, 0)
    off = 4
    message = data[off : off + mlen].decode() if mlen >= 0 else ""
    off += max(mlen, 0)
    if err:
        raise WireError(f"SASL authentication failed ({err}): {message}")
    (blen,) = struct.unpack_from(">i", data, off)
    return data[off + 4 : off + 4 + blen]


def _scram(conn: Conn, user: str, password: str) -> None:
    data = conn.call(17, 1, _str("SCRAM-SHA-512"))
    (err,) = struct.unpack_from(">h", data, 0)
    if err:
        raise WireError(f"the broker does not offer SCRAM-SHA-512 (error {err})")
    nonce = base64.b64encode(secrets.token_bytes(18)).decode()
    first_bare = f"n={user},r={nonce}"
    server_first = _authenticate(conn, f"n,,{first_bare}".encode()).decode()
    fields = dict(part.split("=", 1) for part in server_first.split(","))
    if not fields["r"].startswith(nonce):
        raise WireError("the broker's SCRAM nonce does not extend ours")
    salted = hashlib.pbkdf2_hmac(
        "sha512", password.encode(), base64.b64decode(fields["s"]), int(fields["i"])
    )
    client_key = hmac.new(salted, b"Client Key", hashlib.sha512).digest()
    stored = hashlib.sha512(client_key).digest()
    final_bare = f"c=biws,r={fields['r']}"
    auth = f"{first_bare},{server_first},{final_bare}".encode()
    signature = hmac.new(stored, auth, hashlib.sha512).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_final = _authenticate(
        conn, f"{final_bare},p={base64.b64encode(proof).decode()}".encode()
    ).decode()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha512).digest()
    expected = base64.b64encode(hmac.new(server_key, auth, hashlib.sha512).digest()).decode()
    if server_final != f"v={expected}":
        raise WireError("the broker's SCRAM signature is wrong")


def metadata(conn: Conn) -> dict[str, object]:
    """Metadata v4 for no topics: the cluster id, controller id and brokers."""
    data = conn.call(3, 4, struct.pack(">i?", -1, False))
    _throttle, nbrokers = struct.unpack_from(">ii", data, 0)
    off = 8
    brokers = []
    for _ in range(nbrokers):
        node_id, hlen = struct.unpack_from(">ih", data, off)
        off += 6
        host = data[off : off + hlen].decode()
        off += hlen
        (bport, rlen) = struct.unpack_from(">ih", data, off)
        off += 6 + max(rlen, 0)
        brokers.append(f"{node_id}@{host}:{bport}")
    (clen,) = struct.unpack_from(">h", data, off)
    off += 2
    cluster_id = data[off : off + clen].decode() if clen >= 0 else None
    off += max(clen, 0)
    (controller,) = struct.unpack_from(">i", data, off)
    return {"cluster_id": cluster_id, "controller_id": controller, "brokers": brokers}


@dataclass(frozen=True)
class Acl:
    principal: str  # "User:name"
    resource: int  # TOPIC, GROUP or CLUSTER
    name: str  # "*", a prefix, or "kafka-cluster"
    pattern: int  # LITERAL or PREFIXED
    operation: str  # a key of OPERATIONS


def create_acls(conn: Conn, acls: list[Acl]) -> None:
    body = struct.pack(">i", len(acls))
    for a in acls:
        body += struct.pack(">b", a.resource) + _str(a.name) + struct.pack(">b", a.pattern)
        body += _str(a.principal) + _str("*")
        body += struct.pack(">bb", OPERATIONS[a.operation], ALLOW)
    data = conn.call(30, 1, body)
    (_throttle, n) = struct.unpack_from(">ii", data, 0)
    off = 8
    for a in acls[:n]:
        (err, mlen) = struct.unpack_from(">hh", data, off)
        off += 4
        message = data[off : off + mlen].decode() if mlen >= 0 else ""
        off += max(mlen, 0)
        if err:
            raise WireError(f"CreateAcls {a}: error {err} {message}")
