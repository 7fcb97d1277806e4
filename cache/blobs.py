"""Latent blobs in an S3-compatible bucket, for farms that keep large objects there.

A PostgreSQL store created with ``blobs="s3://bucket/prefix"`` keeps each entry's safetensors bytes
in an object whose key the store derives from the entry id alone, and only the size and SHA-256 in
its row::

    prefix/chai-store.json          marker: format name and the store id (written at creation)
    prefix/<entry id>.safetensors   one entry's latents

No key is ever read from a row, so a database from someone else cannot point the store at another
object or bucket; the store uses a prefix only when the marker there names its own store id, and
deletes only objects of its own naming (``<digits>.safetensors``). The order is object first, row
second: a client killed in between leaves an object without a row, which ``verify`` deletes once it
is older than a grace period (an insert still in flight may own a young one). An object's size is
checked (``Content-Length``) before its bytes are read, and at most the row's size is ever read.

Endpoint and credentials come from boto3's own configuration (``AWS_ENDPOINT_URL`` for MinIO, Ceph
or a local moto server, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``), never from
the store's URL or tables.
"""

from __future__ import annotations

import json
import re
from typing import Iterable

from .store_files import FORMAT_NAME, MARKER_NAME, BlobError, latent_name
from .store_types import MAX_ENTRY_BYTES, StoreError

__all__ = ["S3BlobStore", "open_blob_store", "parse_blob_url"]

# S3 bucket naming rules (3-63 lower-case letters, digits, dots, hyphens); a prefix of plain path parts.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_ENTRY_KEY = re.compile(r"^([1-9][0-9]{0,18})\.safetensors$")
MAX_MARKER_BYTES = 4096


def parse_blob_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` as (bucket, prefix without slashes at either end).

    Raises:
        StoreError: another scheme, a bucket name S3 would refuse, or a prefix with empty, ``.`` or
            ``..`` parts or characters outside letters, digits, ``._-``.
    """
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise StoreError(f"blob location {str(url)[:80]!r} is not s3://BUCKET/PREFIX")
    bucket, _, prefix = url[5:].partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET.match(bucket) or (prefix and (not _PREFIX.match(prefix)
                                                 or any(p in (".", "..") for p in prefix.split("/")))):
        raise StoreError(f"blob location {url[:80]!r} is not s3://BUCKET/PREFIX (a bucket name of 3-63 lower-case "
                         "letters, digits, '.' or '-'; a prefix of letters, digits, '.', '_', '-' and '/')")
    return bucket, prefix


def open_blob_store(url: str) -> "S3BlobStore":
    """The blob store of a ``s3://bucket/prefix`` URL.

    Raises:
        StoreError: see :func:`parse_blob_url`; boto3 missing, or the bucket cannot be reached.
    """
    bucket, prefix = parse_blob_url(url)
    return S3BlobStore(bucket, prefix)


class S3BlobStore:
    """Entry objects under one prefix of one bucket (boto3); every key derived from an entry id.

    Args:
        bucket: bucket name (it must exist). prefix: key prefix ("" for the bucket's root).

    Raises:
        StoreError: boto3 missing, or the bucket is unreachable or absent (checked once here).
    """

    def __init__(self, bucket: str, prefix: str = "") -> None:
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

    def key(self, entry_id: int) -> str:
        """The object key of an entry: ``prefix/<entry id>.safetensors``."""
        return self.prefix + latent_name(entry_id)

    # ------------------------------------------------------------------ the marker
    def read_marker(self) -> dict | None:
        """The prefix's marker (``chai-store.json``), or None when there is none.

        Raises:
            StoreError: a marker that is larger than 4 KiB or not a JSON object.
        """
        try:
            body = self._get(self.prefix + MARKER_NAME, MAX_MARKER_BYTES, exact=False)
        except BlobError as exc:
            raise StoreError(f"{self.url}/{MARKER_NAME} is not a CHAI store marker ({exc}); give the store another "
                             "prefix") from None
        if body is None:
            return None
        try:
            marker = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            marker = None
        if not isinstance(marker, dict):
            raise StoreError(f"{self.url}/{MARKER_NAME} is not a CHAI store marker; this prefix was not made by CHAI: "
                             "give the store another prefix")
        return marker

    def claim(self, store_id: str) -> None:
        """Make an empty prefix the store's: write its marker (format name and ``store_id``).

        Raises:
            StoreError: the prefix already holds objects (another store's or someone's): CHAI never
                deletes objects it did not make, so it only takes an empty prefix.
        """
        found = self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1).get("Contents", [])
        if found:
            raise StoreError(f"{self.url} already holds objects ({found[0]['Key']}, ...); a new store needs an empty "
                             "prefix: give another s3://BUCKET/PREFIX")
        marker = {"format": FORMAT_NAME, "store_id": store_id}
        self._client.put_object(Bucket=self.bucket, Key=self.prefix + MARKER_NAME, Body=json.dumps(marker).encode())

    def check_owner(self, store_id: str) -> None:
        """Refuse a prefix whose marker does not name ``store_id``.

        Raises:
            StoreError: no marker, another format, or another store's id (a database that names a
                bucket it does not own).
        """
        marker = self.read_marker()
        if marker is None or marker.get("format") != FORMAT_NAME or marker.get("store_id") != store_id:
            found = "is missing" if marker is None else "names another store"
            raise StoreError(f"{self.url} is not this store's bucket prefix (its {MARKER_NAME} {found}); the database "
                             "names a bucket prefix it does not own, so nothing there is read or deleted: fix the "
                             "database's blobs setting or use another database")

    # ------------------------------------------------------------------ entries
    def put(self, entry_id: int, data: bytes) -> None:
        """Write an entry's latents."""
        self._client.put_object(Bucket=self.bucket, Key=self.key(entry_id), Body=data)

    def get(self, entry_id: int, nbytes: int) -> bytes:
        """An entry's latents, read only after the object's ``Content-Length`` equals ``nbytes``
        (at most ``MAX_ENTRY_BYTES``); never more than ``nbytes`` bytes are read.

        Raises:
            BlobError: the object is missing, of another size, or larger than the cap.
        """
        if not 0 < int(nbytes) <= MAX_ENTRY_BYTES:
            raise BlobError(f"the row records {nbytes} bytes for this entry, outside 1..{MAX_ENTRY_BYTES}")
        body = self._get(self.key(entry_id), int(nbytes), exact=True)
        if body is None:
            raise BlobError(f"latent object {self.key(entry_id)} is missing")
        return body

    def size(self, entry_id: int) -> int | None:
        """An entry object's size in bytes, or None when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            return int(self._client.head_object(Bucket=self.bucket, Key=self.key(entry_id))["ContentLength"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def delete(self, entry_ids: Iterable[int]) -> None:
        """Delete entries' objects (missing ones are ignored), 1000 per request."""
        keys = [self.key(i) for i in entry_ids]
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start:start + 1000]]
            self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})

    def scan(self) -> tuple[list[tuple[int, float]], list[str]]:
        """Every object under the prefix: ([(entry id, last-modified UNIX seconds)] of objects of the
        store's naming, [keys of anything else except the marker]); the latter are never touched."""
        entries, others = [], []
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                name = obj["Key"][len(self.prefix):]
                match = _ENTRY_KEY.match(name)
                if match and int(match.group(1)) < 1 << 63:
                    entries.append((int(match.group(1)), obj["LastModified"].timestamp()))
                elif name != MARKER_NAME:
                    others.append(obj["Key"])
        return entries, others

    def _get(self, key: str, limit: int, exact: bool) -> bytes | None:
        """An object's bytes when its Content-Length is ``limit`` (``exact``) or at most ``limit``;
        None when it does not exist. The body is read only after that check, and never past ``limit``."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except self._client.exceptions.NoSuchKey:
            return None
        body = response["Body"]
        try:
            length = int(response.get("ContentLength", -1))
            if (length != limit) if exact else not 0 <= length <= limit:
                raise BlobError(f"object {key} is {length} bytes, " + (f"the row recorded {limit}" if exact else
                                                                      f"more than the {limit} allowed"))
            data = body.read(length)
            if len(data) != length or body.read(1):
                raise BlobError(f"object {key} did not hold the {length} bytes its Content-Length said")
            return data
        finally:
            body.close()
