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
    """The entry objects in the bucket (the store's marker left out)."""
    return {o["Key"] for o in client.list_objects_v2(Bucket="chai-farm").get("Contents", [])} - {MARKER}


def _entry_keys(pg_url) -> set[str]:
    """The object keys the store derives from its entry ids."""
    return {f"latents/{i}.safetensors" for (i,) in _sql(pg_url, "SELECT id FROM chai_entries")}


MARKER = "latents/chai-store.json"


def test_latents_live_in_the_bucket_and_follow_every_removal(pg_url, s3):
    with PostgresStore(pg_url, dim=DIM, blobs=BLOBS) as store:
        ids = {put_seeded(store, s): s for s in range(8)}
        assert all(null for (null,) in _sql(pg_url, "SELECT blob IS NULL FROM chai_entries"))
        assert _keys(s3) == _entry_keys(pg_url) == {f"latents/{i}.safetensors" for i in ids}
        for entry_id, seed in ids.items():
            assert_seeded_entry(store, entry_id, seed)
        size = store.entry(next(iter(ids))).nbytes
        store.delete([next(iter(ids))])
        store.set_budget(3 * size, evict_to_fit=True)  # evicts down to three entries (LRU)
        assert len(store) <= 3 and _keys(s3) == _entry_keys(pg_url)
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
        s3.delete_object(Bucket="chai-farm", Key=f"latents/{ids[0]}.safetensors")
        s3.put_object(Bucket="chai-farm", Key=f"latents/{ids[1]}.safetensors", Body=b"not the latents")
        assert store.load(ids[0]) is None and store.entry(ids[0]) is None
        s3.put_object(Bucket="chai-farm", Key="latents/999999.safetensors", Body=b"x" * 10)
        s3.put_object(Bucket="chai-farm", Key="latents/notes.txt", Body=b"someone's")
        young = store.verify()  # the orphan may belong to an insert in flight: kept
        assert young.files_quarantined == [str(ids[1])] and young.orphans_removed == []
        assert "latents are 15 bytes, the row recorded" in young.problems[0]  # refused on its size, never read
        old = store.verify(orphan_grace_s=0)
        assert old.orphans_removed == ["latents/999999.safetensors"] and old.left_alone == ["latents/notes.txt"]
        assert not store.verify(orphan_grace_s=0).problems
        assert "latents/notes.txt" in _keys(s3)  # not of the store's naming: never touched
        assert store.stats().quarantined == 2
        assert_seeded_entry(store, ids[2], 2)
    assert_consistent(pg_url)


@pytest.mark.slow
def test_killed_clients_leave_no_partial_entry_with_s3(pg_url, s3, tmp_path):
    PostgresStore(pg_url, dim=DIM, blobs=BLOBS).close()
    check_killed_clients(pg_url, tmp_path, clients=3, rng_seed=1)
    with PostgresStore(pg_url) as store:
        store.verify(orphan_grace_s=0)  # objects of inserts killed before their row committed
    assert _keys(s3) == _entry_keys(pg_url)


def test_unreachable_bucket_is_a_clear_error(pg_url, s3):
    with pytest.raises(StoreError, match="cannot use bucket 'missing-bucket'.*AWS_ENDPOINT_URL"):
        PostgresStore(pg_url, dim=DIM, blobs="s3://missing-bucket/x")
    with pytest.raises(StoreError, match="not s3://BUCKET/PREFIX"):
        PostgresStore(pg_url, dim=DIM, blobs="gs://x")


def test_a_database_cannot_point_the_store_at_a_prefix_it_does_not_own(pg_url, s3):
    """Object keys come from entry ids and the prefix's marker must name the store: a database
    edited to name another store's prefix (or someone's) gets nothing read or deleted there."""
    s3.put_object(Bucket="chai-farm", Key="theirs/report.pdf", Body=b"someone's file")
    with pytest.raises(StoreError, match="already holds objects .*needs an empty prefix"):
        PostgresStore(pg_url, dim=DIM, blobs="s3://chai-farm/theirs")
    with PostgresStore(pg_url, dim=DIM, blobs=BLOBS) as store:
        put_seeded(store, 0)
    _sql(pg_url, "UPDATE chai_meta SET value='s3://chai-farm/theirs' WHERE key='blobs'")
    with pytest.raises(StoreError, match="not this store's bucket prefix .*missing"):
        PostgresStore(pg_url)
    s3.put_object(Bucket="chai-farm", Key="theirs/chai-store.json", Body=b'{"format": "x", "store_id": "y"}')
    with pytest.raises(StoreError, match="not this store's bucket prefix .*names another store"):
        PostgresStore(pg_url)
    assert {o["Key"] for o in s3.list_objects_v2(Bucket="chai-farm", Prefix="theirs/")["Contents"]} == {
        "theirs/report.pdf", "theirs/chai-store.json"}
