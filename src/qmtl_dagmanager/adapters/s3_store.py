"""Archives in S3-compatible object storage (AWS S3, SeaweedFS, MinIO, ...), through the
MinIO Python SDK: one client per store, calls made from a worker thread by the archive."""

from __future__ import annotations

import io
import urllib.parse

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from qmtl_dagmanager.core.errors import Unavailable

S3_ERRORS = (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError)


def parse_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` → ("bucket", "some/prefix/")."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"{url!r} is not s3://<bucket>[/<prefix>]")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


class S3Store:
    """Objects in one bucket. `endpoint` is `http(s)://host:port` (empty: AWS)."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint: str = "",
        access_key: str = "",
        secret_key: str = "",
        region: str = "us-east-1",
        timeout: float = 30.0,
    ) -> None:
        parts = urllib.parse.urlsplit(endpoint or "https://s3.amazonaws.com")
        self.bucket = bucket
        self.location_prefix = f"s3://{bucket}/"
        self._client = Minio(
            parts.netloc,
            access_key=access_key or None,
            secret_key=secret_key or None,
            secure=parts.scheme == "https",
            region=region,
            http_client=urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=timeout, read=timeout),
                retries=urllib3.Retry(total=2, backoff_factor=0.2),
            ),
        )

    def _fail(self, what: str, e: Exception) -> Unavailable:
        return Unavailable(f"S3 {what} in bucket {self.bucket}: {e}", reason="ArchiveUnavailable")

    def ensure_bucket(self) -> None:
        try:
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket)
        except S3_ERRORS as e:
            raise self._fail("bucket check", e) from e

    def put(self, key: str, data: bytes) -> str:
        try:
            self._client.put_object(self.bucket, key, io.BytesIO(data), len(data))
        except S3_ERRORS as e:
            raise self._fail(f"upload of {key}", e) from e
        return self.location_prefix + key

    def get(self, key: str) -> bytes:
        key = key.removeprefix(self.location_prefix)
        try:
            response = self._client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()
        except S3Error as e:
            raise self._fail(f"read of {key} ({e.code})", e) from e
        except S3_ERRORS as e:
            raise self._fail(f"read of {key}", e) from e

    def keys(self, prefix: str) -> list[str]:
        try:
            found = self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
            return sorted(str(o.object_name) for o in found if o.object_name)
        except S3_ERRORS as e:
            raise self._fail(f"listing of {prefix or '/'}", e) from e
