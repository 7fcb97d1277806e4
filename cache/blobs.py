"""Latent blobs in an S3-compatible bucket, for farms that keep large objects there.

A PostgreSQL store created with ``blobs="s3://bucket/prefix"`` keeps each entry's safetensors bytes
in the object ``prefix/<uid>.safetensors`` and only the key, size and SHA-256 in its row. The
order is object first, row second: a client killed in between leaves an object without a row,
which ``verify`` deletes once it is older than a grace period (an insert still in flight may own a
young one). The SHA-256 in the row is checked on every load, as for ``bytea`` blobs.

Endpoint and credentials come from boto3's own configuration (``AWS_ENDPOINT_URL`` for MinIO, Ceph
or a local moto server, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``), never from
the store's URL or tables.
"""

from __future__ import annotations

from typing import Iterable, Iterator

__all__ = ["S3BlobStore", "open_blob_store"]


def open_blob_store(url: str) -> "S3BlobStore":
    """The blob store of a ``s3://bucket/prefix`` URL.

    Raises:
        StoreError: another scheme, no bucket, boto3 missing, or the bucket cannot be reached.
    """
    from .store import StoreError

    if not isinstance(url, str) or not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise StoreError(f"blob location {url!r} is not s3://BUCKET/PREFIX")
    bucket, _, prefix = url[5:].partition("/")
    return S3BlobStore(bucket, prefix.strip("/"))


class S3BlobStore:
    """Objects under one prefix of one bucket (boto3).

    Args:
        bucket: bucket name (it must exist). prefix: key prefix ("" for the bucket's root).

    Raises:
        StoreError: boto3 missing, or the bucket is unreachable or absent (checked once here).
    """

    def __init__(self, bucket: str, prefix: str = "") -> None:
        from .store import StoreError

        try:
            import boto3
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError as exc:
            raise StoreError("latents in S3 need boto3: pip install boto3 (or pip install -e '.[s3]')") from exc
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.url = f"s3://{bucket}/{prefix}"
        self._errors = (BotoCoreError, ClientError)
        self._client = boto3.client("s3")
        try:
            self._client.head_bucket(Bucket=bucket)
        except self._errors as exc:
            raise StoreError(f"cannot use bucket {bucket!r} ({exc}); create it, or set AWS_ENDPOINT_URL and the "
                             "AWS credentials (environment or ~/.aws) for your S3-compatible server") from None

    def put(self, name: str, data: bytes) -> str:
        """Write one object; returns its key."""
        key = self.prefix + name
        self._client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return key

    def get(self, key: str) -> bytes:
        """An object's bytes.

        Raises:
            KeyError: no such object.
        """
        try:
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except self._client.exceptions.NoSuchKey:
            raise KeyError(key) from None

    def size(self, key: str) -> int | None:
        """An object's size in bytes, or None when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            return int(self._client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def delete(self, keys: Iterable[str]) -> None:
        """Delete objects (missing ones are ignored), 1000 per request."""
        keys = list(keys)
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start:start + 1000]]
            self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})

    def list(self) -> Iterator[tuple[str, float]]:
        """(key, last-modified UNIX seconds) of every object under the prefix."""
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"], obj["LastModified"].timestamp()
