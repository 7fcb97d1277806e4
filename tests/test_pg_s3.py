"""PostgreSQL store with latents in an S3 bucket: a real moto S3 server on 127.0.0.1 and the real
embedded PostgreSQL. Object first, row second; orphans collected by verify; the same checks."""

from __future__ import annotations

import socket

import pytest

from _store_util import DIM, assert_seeded_entry, put_seeded
from comfyui_chai.cache.pgstore import PostgresStore
from comfyui_chai.cache.store import StoreError
from test_pgstore import _sql, assert_consistent, check_killed_clients

BLOBS = "s3://chai-farm/latents"


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A fresh bucket 'chai-farm' on the moto server; boto3 configured through the environment."""
    import boto3

    for name, value in (("AWS_ENDPOINT_URL", s3_endpoint), ("AWS_ACCESS_KEY_ID", "farm"),
                        ("AWS_SECRET_ACCESS_KEY", "farm-secret"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    client = boto3.client("s3")
    bucket = client.list_buckets()["Buckets"]
    for b in bucket:
        for obj in client.list_objects_v2(Bucket=b["Name"]).get("Contents", []):
            client.delete_object(Bucket=b["Name"], Key=obj["Key"])
        client.delete_bucket(Bucket=b["Name"])
    client.create_bucket(Bucket="chai-farm")
    return client


def _keys(client) -> set[str]:
    return {o["Key"] for o in client.list_objects_v2(Bucket="chai-farm").get("Contents", [])}


def test_latents_live_in_the_bucket_and_follow_every_removal(pg_url, s3):
    with PostgresStore(pg_url, dim=DIM, blobs=BLOBS) as store:
        ids = {put_seeded(store, s): s for s in range(8)}
        rows = _sql(pg_url, "SELECT blob IS NULL, blob_key FROM chai_entries ORDER BY id")
        assert all(null for null, _ in rows) and _keys(s3) == {k for _, k in rows}
        assert all(k.startswith("latents/") for _, k in rows)
        for entry_id, seed in ids.items():
            assert_seeded_entry(store, entry_id, seed)
        size = store.entry(next(iter(ids))).nbytes
        store.delete([next(iter(ids))])
        store.set_budget(3 * size, evict_to_fit=True)  # evicts down to three entries (LRU)
        assert len(store) <= 3 and _keys(s3) == {k for (k,) in _sql(pg_url, "SELECT blob_key FROM chai_entries")}
    with PostgresStore(pg_url) as store:  # later clients learn the bucket from the database
        assert store.blobs is not None and store.blobs.url == BLOBS
        for r in store.entries():
            assert store.load(r.entry_id) is not None
    with pytest.raises(StoreError, match="keeps its latents in s3://chai-farm/latents, not s3://other"):
        PostgresStore(pg_url, blobs="s3://other/x")
    assert_consistent(pg_url, deleted=1)


def test_missing_or_damaged_objects_are_quarantined_and_orphans_collected(pg_url, s3):
    with PostgresStore(pg_url, dim=DIM, blobs=BLOBS) as store:
        ids = [put_seeded(store, s) for s in range(4)]
        keys = dict(_sql(pg_url, "SELECT id, blob_key FROM chai_entries"))
        s3.delete_object(Bucket="chai-farm", Key=keys[ids[0]])
        s3.put_object(Bucket="chai-farm", Key=keys[ids[1]], Body=b"not the latents")
        assert store.load(ids[0]) is None and store.entry(ids[0]) is None
        s3.put_object(Bucket="chai-farm", Key="latents/orphan.safetensors", Body=b"x" * 10)
        young = store.verify()  # the orphan may belong to an insert in flight: kept
        assert young.files_quarantined == [str(ids[1])] and young.orphans_removed == []
        old = store.verify(orphan_grace_s=0)
        assert old.orphans_removed == ["latents/orphan.safetensors"] and not store.verify(orphan_grace_s=0).problems
        assert store.stats().quarantined == 2
        assert_seeded_entry(store, ids[2], 2)
    assert_consistent(pg_url)


@pytest.mark.slow
def test_killed_clients_leave_no_partial_entry_with_s3(pg_url, s3, tmp_path):
    PostgresStore(pg_url, dim=DIM, blobs=BLOBS).close()
    check_killed_clients(pg_url, tmp_path, clients=3, rng_seed=1)
    with PostgresStore(pg_url) as store:
        store.verify(orphan_grace_s=0)  # objects of inserts killed before their row committed
    assert _keys(s3) == {k for (k,) in _sql(pg_url, "SELECT blob_key FROM chai_entries")}


def test_unreachable_bucket_is_a_clear_error(pg_url, s3):
    with pytest.raises(StoreError, match="cannot use bucket 'missing-bucket'.*AWS_ENDPOINT_URL"):
        PostgresStore(pg_url, dim=DIM, blobs="s3://missing-bucket/x")
    with pytest.raises(StoreError, match="not s3://BUCKET/PREFIX"):
        PostgresStore(pg_url, dim=DIM, blobs="gs://x")
