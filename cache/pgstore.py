"""The CHAI latent store in PostgreSQL with pgvector: one cache shared by a render farm.

Same public API and guarantees as the folder store (:class:`.store.LatentStore`), so
:class:`.lookup.CacheLookup`, the pipeline and the CLI work on it unchanged; what differs is where
things live:

* entries, counters, lookup log, events and the budget in tables ``chai_*`` of one database;
* entity vectors in ``chai_entities.embedding vector(dim)`` with an HNSW cosine index (pgvector
  >= 0.5), maintained by PostgreSQL in the same transaction as the rows;
* latents in ``chai_entries.blob`` (``bytea``, stored uncompressed) by default, so an entry is one
  transaction; or in an S3-compatible bucket (:mod:`.blobs`): object first, row second, objects
  without a row collected by ``verify`` once they are older than a grace period.

Guarantees across machines:

* The byte budget is never exceeded: every change to the set of entries (insert with its
  evictions, delete, quarantine, a new budget) runs under one transaction-scoped advisory lock, and
  commits before releasing it, so committed states are serial.
* A client killed mid-insert leaves nothing: the transaction never commits (a bucket object it
  wrote is collected later).
* A dropped connection (server restart, network) is reconnected; the failed operation is retried
  for up to ``retry_seconds`` with a warning, then a :class:`StoreError` names what to do. An insert
  retried after an ambiguous commit is not stored twice (each entry carries a client-made uid).
* Credentials come from ``PGPASSWORD``, ``~/.pgpass`` or a service file (libpq's own rules), never
  from the URL: a URL with a password is refused, since URLs end up in workflows, reports and logs.

A database from elsewhere is untrusted, as a store folder is (docs/store_security.md): latents are
size-checked in the query before a byte is sent, then checked (SHA-256, safetensors header against
the key's tensor spec) before a tensor is built; text is read truncated; ``chai_meta`` is parsed
and range-checked; bucket keys come from entry ids, never from rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import threading
import time
import uuid
from dataclasses import fields, replace
from typing import Callable, Mapping, Sequence, TypeVar

import numpy as np

from .policy import EvictionPolicy
from .store_budget import budget_error, check_entry_fits, validate_budget
from .store_files import BlobError, check_safetensors, decode_latents, encode_entry, spec_mismatch
from .store_manifest import LOOKUP_LOG_KEEP, MAX_THUMBNAIL_BYTES, check_thumbnail, count_value, parse_tensor_spec
from .store_types import (
    MAX_ENTRY_BYTES,
    DiskFullError,
    EntityMatch,
    EntryRecord,
    EntryTooLargeError,
    PinnedError,
    StoreConfig,
    StoreError,
    StoreStats,
    VerifyReport,
)

__all__ = ["PostgresStore", "is_postgres_url", "open_location", "read_location_stats", "location_exists",
           "SCHEMA_VERSION"]

log = logging.getLogger("comfyui_chai.pgstore")

# pg2: latents in the bucket at keys derived from entry ids (pg1, a development format, named keys in rows).
# pg3 (issue 15): entries may be pinned (never evicted) and keep a thumbnail; the lookup log names the
# entry a hit served. A pg2 store is upgraded in place when a client with the right to alter its tables
# opens it (:meth:`PostgresStore._upgrade_pg2`).
SCHEMA_VERSION = "pg3"
_UPGRADABLE = "pg2"
MIN_PGVECTOR = (0, 5, 0)  # HNSW indexes
MAX_DIM = 2000  # pgvector's limit for an HNSW index on vector(n)
_COUNTERS = ("hits", "misses", "lookups", "evictions", "inserts", "repairs", "quarantined", "lookup_ms_sum",
             "bytes_held", "generation")
# One writer lock per database: pg_advisory_xact_lock(key), key = first 8 bytes of a hash.
_WRITER_LOCK = int.from_bytes(hashlib.sha256(b"comfyui-chai latent store writer").digest()[:8], "big", signed=True)
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
# What a read takes from a row, whatever a database from elsewhere holds (see docs/store_security.md).
_MAX_TEXT = 1000  # characters of an entity or a matched text
_MAX_PROMPT = 10_000  # characters of a prompt (the embedder refuses prompts over 2,000)
_MAX_ENTITIES = 256  # entities per entry
_MAX_INFO = 1 << 16  # bytes of an entry's info JSON
_T = TypeVar("_T")
# An entry's latents with what checks them; the bytes leave the server only when their length is the
# recorded one and within the cap (a crafted row cannot make a client allocate more).
_LATENT_QUERY = (
    "SELECT e.nbytes, left(e.sha256, 64), left(p.tensor_spec, 65536), octet_length(e.blob), "
    "CASE WHEN octet_length(e.blob) = e.nbytes AND e.nbytes BETWEEN 1 AND %s THEN e.blob END "
    "FROM chai_entries e LEFT JOIN chai_partitions p ON p.compat_key = e.compat_key WHERE e.id = %s")

# pg2 -> pg3, in one transaction under the writer lock (no row is rewritten: the new columns have
# constant defaults).
_UPGRADE_PG2 = (
    "ALTER TABLE chai_entries ADD COLUMN IF NOT EXISTS pinned boolean NOT NULL DEFAULT false",
    "ALTER TABLE chai_entries ADD COLUMN IF NOT EXISTS thumbnail bytea",
    "ALTER TABLE chai_lookup_log ADD COLUMN IF NOT EXISTS entry_id bigint",
)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS chai_meta(key text PRIMARY KEY, value text NOT NULL)",
    """CREATE TABLE IF NOT EXISTS chai_entries(
        id bigserial PRIMARY KEY,
        uid text NOT NULL UNIQUE,
        compat_key text NOT NULL,
        prompt text NOT NULL,
        nbytes bigint NOT NULL,
        sha256 text NOT NULL,
        created_at double precision NOT NULL,
        last_access double precision NOT NULL,
        access_count bigint NOT NULL DEFAULT 0,
        info text NOT NULL DEFAULT '{}',
        blob bytea,
        pinned boolean NOT NULL DEFAULT false,
        thumbnail bytea)""",
    # Latents do not compress: skip pglz on every insert and read.
    "ALTER TABLE chai_entries ALTER COLUMN blob SET STORAGE EXTERNAL",
    "CREATE INDEX IF NOT EXISTS chai_entries_lru ON chai_entries(last_access, id)",
    "CREATE INDEX IF NOT EXISTS chai_entries_lfu ON chai_entries(access_count, last_access, id)",
    "CREATE INDEX IF NOT EXISTS chai_entries_fifo ON chai_entries(created_at, id)",
    "CREATE TABLE IF NOT EXISTS chai_partitions(compat_key text PRIMARY KEY, tensor_spec text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS chai_counters(name text PRIMARY KEY, value double precision NOT NULL)",
    "CREATE TABLE IF NOT EXISTS chai_entity_counts(text text PRIMARY KEY, count bigint NOT NULL)",
    """CREATE TABLE IF NOT EXISTS chai_lookup_log(
        id bigserial PRIMARY KEY, time double precision NOT NULL, prompt text NOT NULL, hit boolean NOT NULL,
        entity text, matched text, similarity double precision, ms double precision NOT NULL, entry_id bigint)""",
    """CREATE TABLE IF NOT EXISTS chai_events(
        id bigserial PRIMARY KEY, time double precision NOT NULL, kind text NOT NULL, detail text NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS chai_quarantine(
        entry_id bigint NOT NULL, time double precision NOT NULL, reason text NOT NULL, blob bytea)""",
)


def is_postgres_url(location: object) -> bool:
    """True when ``location`` is a ``postgresql://`` (or ``postgres://``) URL, not a folder."""
    return isinstance(location, str) and location.strip().lower().startswith(("postgresql://", "postgres://"))


def _parse_url(url: str) -> dict:
    """Validate a store URL and return libpq's view of it.

    Raises:
        StoreError: not a PostgreSQL URL, unparsable, or holding a password.
    """
    if not is_postgres_url(url):
        raise StoreError(f"{url!r} is not a postgresql:// URL")
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError as exc:
        raise StoreError("a postgresql:// store needs psycopg and pgvector: pip install 'psycopg[binary]' pgvector "
                         "(or pip install -e '.[postgres]')") from exc
    try:
        parts = conninfo_to_dict(url.strip())
    except Exception as exc:
        raise StoreError(f"bad PostgreSQL URL ({str(exc).strip()}); write it as "
                         "postgresql://USER@HOST:PORT/DATABASE (password in PGPASSWORD or ~/.pgpass)") from None
    if parts.get("password"):
        raise StoreError("the store URL holds a password; remove it and put it in PGPASSWORD or ~/.pgpass "
                         "(URLs are saved in workflows, reports and logs)")
    return parts


def _connect_error(exc: Exception, where: str) -> StoreError:
    """A one-line StoreError for a failed connection, naming what to do."""
    text = str(exc).strip()
    low = text.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        return StoreError(f"PostgreSQL at {where} refused the login ({_last_line(text)}); set the right password "
                          "in PGPASSWORD or ~/.pgpass (host:port:database:user:password), never in the URL")
    if "does not exist" in low and "database" in low:
        return StoreError(f"PostgreSQL at {where}: {_last_line(text)}; create it (createdb, or CREATE DATABASE) "
                          "or fix the database name in the URL")
    if "role" in low and "does not exist" in low:
        return StoreError(f"PostgreSQL at {where}: {_last_line(text)}; fix the user in the URL")
    if any(s in low for s in ("connection refused", "no such file or directory", "could not connect",
                              "timeout expired", "could not translate host", "failed to resolve",
                              "is the server running", "server closed the connection", "name or service",
                              "the database system is")):  # shutting down, starting up, in recovery
        return StoreError(f"cannot reach PostgreSQL at {where} ({_last_line(text)}); start the server "
                          "(python -m comfyui_chai db start DIR for the embedded one) or fix host and port in the URL")
    return StoreError(f"cannot use PostgreSQL at {where} ({_last_line(text)})")


def _loads(text):
    """JSON from a row, or None when it is not JSON (a row from elsewhere may hold anything)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\t", " ").splitlines() if ln.strip()]
    line = lines[0] if lines else text
    return line.split("failed: ", 1)[-1] if "failed: " in line else line


def _parse_dim(value: str, location: str) -> int:
    """The stored embedding width, checked (1..MAX_DIM). Raises StoreError naming the field."""
    if not (isinstance(value, str) and value.isdigit() and 1 <= int(value) <= MAX_DIM):
        raise StoreError(f"the database at {location} holds a CHAI store whose dim is {str(value)[:20]!r}, a value "
                         "CHAI never writes; use another database")
    return int(value)


def _parse_meta(meta: Mapping[str, str], location: str) -> dict:
    """The store's settings from ``chai_meta``, each parsed and range-checked (a database from
    elsewhere may hold anything): schema_version, store_id, budget_bytes, policy, dim (None before
    the first entry) and blobs (``""`` for bytea).

    Raises:
        StoreError: another schema version, or a value CHAI never writes (the message names the field).
    """
    from .blobs import parse_blob_url

    def bad(name: str) -> StoreError:
        return StoreError(f"the database at {location} holds a CHAI store whose {name} is "
                          f"{str(meta.get(name))[:80]!r}, a value CHAI never writes; use another database")

    if meta.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"the database at {location} holds a CHAI store of schema "
                         f"{str(meta.get('schema_version'))[:40]!r}, not {SCHEMA_VERSION!r}; use the pack version "
                         "that created it or another database")
    out: dict = {}
    if not _HEX32.match(meta.get("store_id") or ""):
        raise bad("store_id")
    out["store_id"] = meta["store_id"]
    try:
        out["budget_bytes"] = validate_budget(int(meta.get("budget_bytes", "")))
    except ValueError:
        raise bad("budget_bytes") from None
    try:
        out["policy"] = EvictionPolicy.parse(meta.get("policy"))
    except ValueError:
        raise bad("policy") from None
    out["dim"] = _parse_dim(meta["dim"], location) if "dim" in meta else None
    out["blobs"] = meta.get("blobs") or ""
    if out["blobs"]:
        try:
            parse_blob_url(out["blobs"])
        except StoreError:
            raise bad("blobs") from None
    return out


class PostgresStore:
    """A latent store in a PostgreSQL database (pgvector), shared by any number of machines.

    Args:
        url: ``postgresql://USER@HOST:PORT/DATABASE`` (libpq URL; ``?host=/socket/dir`` for a Unix
            socket). No password: libpq reads ``PGPASSWORD`` or ``~/.pgpass``.
        config: :class:`StoreConfig`; ``budget_bytes`` and ``policy`` replace the persisted ones
            when given; ``index_M`` / ``index_ef_construction`` shape the HNSW index when it is
            created; ``index_ef_search`` is pgvector's ``hnsw.ef_search``; ``durable=False`` turns
            ``synchronous_commit`` off for this client (simulations).
        dim: embedding dimension; required for a new store unless the first insert sets it.
        budget_bytes / policy: as in :class:`LatentStore`.
        blobs: ``s3://bucket/prefix`` to keep latents in a bucket instead of ``bytea`` (only when
            the store is created; later clients read it from the database).
        retry_seconds: how long an operation keeps retrying after the connection dropped.
        connect_timeout: seconds to wait for a connection (libpq ``connect_timeout``).
        config_is_default: ``config``'s budget and policy only apply to a new store (an existing
            one keeps its own unless ``budget_bytes`` / ``policy`` are given).

    Raises:
        StoreError: bad URL, server unreachable, login refused, no pgvector, a store of another
            schema version or embedding dimension.
        ValueError: a non-positive budget or an unknown policy.
    """

    def __init__(self, url: str, config: StoreConfig | None = None, dim: int | None = None,
                 budget_bytes: int | None = None, policy: str | EvictionPolicy | None = None, *,
                 blobs: str | None = None, retry_seconds: float = 60.0, connect_timeout: int = 10,
                 config_is_default: bool = False, evict_to_fit: bool = False) -> None:
        self._conninfo = url.strip()
        _parse_url(self._conninfo)
        # Safe to show: a URL with a password is refused above.
        self.location = self._conninfo
        base = config or StoreConfig()
        if budget_bytes is not None:
            base = replace(base, budget_bytes=budget_bytes)
        if policy is not None:
            base = replace(base, policy=EvictionPolicy.parse(policy))
        validate_budget(base.budget_bytes)
        self.config = replace(base, policy=EvictionPolicy.parse(base.policy))
        from_config = config is not None and not config_is_default
        self._explicit_budget = budget_bytes is not None or from_config
        self._explicit_policy = policy is not None or from_config
        self.retry_seconds = float(retry_seconds)
        self.connect_timeout = int(connect_timeout)
        self._local = threading.local()
        self._conns: list = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self._vector_ready = False
        self.open_report: list[str] = []
        self.notes: list[str] = []  # what opening it did (an upgrade from pg2)
        self.dim: int | None = None
        self.blobs = None
        conn = self._conn(retry=False)
        self._init_schema(conn, dim, blobs)
        self._apply_config(evict_to_fit)

    @classmethod
    def open(cls, url: str, **kwargs) -> "PostgresStore":
        """Open (or create) a store; same arguments as the constructor."""
        return cls(url, **kwargs)

    @property
    def path(self) -> str:
        """The URL (no password in it), where a folder store has its path."""
        return self.location

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    @property
    def budget_bytes(self) -> int:
        """The byte budget in force (the persisted one, read from the database)."""
        self._run(self._adopt_meta, transaction=False)
        return self.config.budget_bytes

    @property
    def policy(self) -> str:
        """The eviction policy in force: ``"lru"``, ``"lfu"`` or ``"fifo"`` (persisted)."""
        self._run(self._adopt_meta, transaction=False)
        return self.config.policy.value

    def set_policy(self, policy: str | EvictionPolicy) -> None:
        """Persist a new eviction policy; every client's next eviction follows it.

        Raises:
            ValueError: an unknown policy.
        """
        parsed = EvictionPolicy.parse(policy)
        self._run(lambda c: c.execute("UPDATE chai_meta SET value=%s WHERE key='policy'", (parsed.value,)))
        self.config = replace(self.config, policy=parsed)

    def compat_keys(self) -> list[str]:
        """The distinct compatibility keys that hold entries, sorted."""
        return [r[0] for r in self._run(lambda c: c.execute(
            "SELECT DISTINCT compat_key FROM chai_entries ORDER BY 1").fetchall(), transaction=False)]

    # ------------------------------------------------------------------ connections
    def _new_connection(self):
        import psycopg

        try:
            conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=self.connect_timeout,
                                   application_name="comfyui-chai")
        except psycopg.OperationalError as exc:
            raise _connect_error(exc, self.location) from None
        if not self.config.durable:
            conn.execute("SET synchronous_commit = off")
        if self._vector_ready:
            self._prepare_vector(conn)
        return conn

    def _prepare_vector(self, conn) -> None:
        from pgvector.psycopg import register_vector

        register_vector(conn)
        conn.execute(f"SET hnsw.ef_search = {int(self.config.index_ef_search)}")
        # Filtering by compatibility key after an approximate scan could return fewer than k
        # rows; iterative scans keep going until k rows pass the filter, in distance order.
        conn.execute("SET hnsw.iterative_scan = strict_order")

    def _conn(self, retry: bool = True):
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed:
            return conn
        if self._closed:
            raise StoreError("the store is closed; open it again")
        conn = self._reconnect() if retry else self._new_connection()
        self._local.conn = conn
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def _reconnect(self):
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.1
        while True:
            try:
                return self._new_connection()
            except StoreError as exc:
                if time.monotonic() + delay > deadline:
                    raise StoreError(f"{exc} (gave up after {self.retry_seconds:.0f} s of retries)") from None
                time.sleep(delay)
                delay = min(2.0, delay * 2)

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def run(self, fn: Callable[..., _T], transaction: bool = True) -> _T:
        """Run ``fn(conn)`` (a psycopg connection; in one transaction unless told otherwise),
        reconnecting after a dropped connection and retrying after a deadlock or serialisation
        failure, for up to ``retry_seconds``. For modules that keep their own tables in the store's
        database (the farm job queue). ``fn`` may run more than once: it must be idempotent.

        Raises:
            StoreError: the connection did not come back in time, or another operational error.
        """
        return self._run(fn, transaction)

    def _run(self, fn: Callable[..., _T], transaction: bool = True) -> _T:
        import psycopg
        from psycopg import errors

        deadline = None
        warned = False
        while True:
            conn = self._conn()
            try:
                if transaction:
                    with conn.transaction():
                        return fn(conn)
                return fn(conn)
            except (errors.DeadlockDetected, errors.SerializationFailure):
                continue  # the server rolled our transaction back; it is safe to run it again
            except errors.DiskFull as exc:
                raise DiskFullError(f"the PostgreSQL server at {self.location} is out of disk space "
                                    f"({_last_line(str(exc))}); free space on it or lower the budget. Nothing "
                                    "committed was lost", self.location) from None
            except psycopg.OperationalError as exc:
                if not (conn.closed or conn.broken):
                    raise StoreError(f"PostgreSQL at {self.location}: {_last_line(str(exc))}") from exc
                self._drop_conn()
                deadline = deadline or time.monotonic() + self.retry_seconds
                if not warned:
                    log.warning("CHAI store %s: lost the connection (%s); reconnecting for up to %.0f s",
                                self.location, _last_line(str(exc)), self.retry_seconds)
                    warned = True
                if time.monotonic() > deadline:
                    raise StoreError(f"lost the connection to PostgreSQL at {self.location} and could not get it "
                                     f"back in {self.retry_seconds:.0f} s; restart the server or check the network") from None
                time.sleep(0.2)

    # ------------------------------------------------------------------ setup
    def _init_schema(self, conn, dim: int | None, blobs: str | None) -> None:
        import psycopg

        from .blobs import open_blob_store

        given_blobs = None
        self._ensure_vector(conn)
        self._vector_ready = True
        self._prepare_vector(conn)
        try:
            with conn.transaction():
                # DDL needs CREATE on the schema even with IF NOT EXISTS: skip it when the store
                # exists, so farm clients with only read/write rights on its tables can open it.
                if conn.execute("SELECT to_regclass('chai_meta') IS NULL").fetchone()[0]:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITER_LOCK,))
                    for statement in _SCHEMA:
                        conn.execute(statement)
                meta = dict(conn.execute("SELECT key, left(value, 1000) FROM chai_meta").fetchall())
                if meta.get("schema_version") == _UPGRADABLE:
                    self._upgrade_pg2(conn)
                    meta["schema_version"] = SCHEMA_VERSION
                if not meta:
                    store_id = uuid.uuid4().hex
                    if blobs:  # a new store's bucket is checked first: failing here rolls everything back
                        given_blobs = open_blob_store(blobs)
                    rows = {"schema_version": SCHEMA_VERSION, "store_id": store_id,
                            "budget_bytes": str(self.config.budget_bytes),
                            "policy": self.config.policy.value, "blobs": blobs or "",
                            "index_params": json.dumps({"M": self.config.index_M,
                                                        "ef_construction": self.config.index_ef_construction})}
                    for key, value in rows.items():
                        conn.execute("INSERT INTO chai_meta VALUES(%s, %s)", (key, value))
                    for name in _COUNTERS:
                        conn.execute("INSERT INTO chai_counters VALUES(%s, 0) ON CONFLICT DO NOTHING", (name,))
                    meta = rows
                parsed = _parse_meta(meta, self.location)
                if dim is not None and parsed["dim"] is None:
                    self._create_entities(conn, int(dim), meta)
                    parsed["dim"] = int(dim)
                if given_blobs is not None:  # last before COMMIT: a marker is never left by a store that failed
                    given_blobs.claim(parsed["store_id"])
        except psycopg.errors.InsufficientPrivilege as exc:
            raise StoreError(f"user {conn.info.user!r} may not create or use the CHAI tables in {self.location} "
                             f"({_last_line(str(exc))}); let the database owner open the store once, then grant "
                             "this user SELECT, INSERT, UPDATE, DELETE on the chai_* tables and USAGE on their "
                             "sequences") from None
        stored = parsed["dim"]
        if dim is not None and stored is not None and int(dim) != stored:
            raise StoreError(f"store {self.location} holds {stored}-d embeddings but the embedder gives {dim}-d; "
                             "use the embedder the store was built with, or another database")
        self.dim = stored
        self.store_id = parsed["store_id"]
        if blobs and parsed["blobs"] != blobs:
            raise StoreError(f"store {self.location} keeps its latents in {parsed['blobs'] or 'the database'}, "
                             f"not {blobs}; leave the blob option out or use another database")
        if parsed["blobs"]:
            self.blobs = given_blobs or open_blob_store(parsed["blobs"])
            self.blobs.check_owner(self.store_id)

    def _ensure_vector(self, conn) -> None:
        """Check that pgvector (>= 0.5, for HNSW) is in the database; create it when allowed."""
        import psycopg

        row = conn.execute("SELECT extversion FROM pg_extension WHERE extname='vector'").fetchone()
        if row is None:
            available = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name='vector'").fetchone()
            if available is None:
                raise StoreError(f"the PostgreSQL server at {self.location} has no pgvector; install pgvector 0.5 "
                                 "or newer on it (package postgresql-NN-pgvector) or use the embedded server "
                                 "(python -m comfyui_chai db start DIR)")
            try:
                with conn.transaction():  # serialised: two first clients would both try to create it
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITER_LOCK,))
                    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.errors.InsufficientPrivilege:
                db = conn.info.dbname
                raise StoreError(f"database {db!r} at {self.location} has no pgvector extension and user "
                                 f"{conn.info.user!r} may not create it; ask an administrator to run "
                                 f"'CREATE EXTENSION vector;' in database {db!r}") from None
            row = conn.execute("SELECT extversion FROM pg_extension WHERE extname='vector'").fetchone()
        version = tuple(int(p) for p in row[0].split(".")[:3] if p.isdigit())
        if version < MIN_PGVECTOR:
            raise StoreError(f"pgvector {row[0]} at {self.location} has no HNSW index; upgrade it to 0.5 or newer "
                             "(ALTER EXTENSION vector UPDATE after installing the new version)")

    def _create_entities(self, conn, dim: int, meta: dict) -> None:
        """Create the entity table and its HNSW index once the dimension is known (caller holds the
        writer lock inside a transaction)."""
        if not 1 <= dim <= MAX_DIM:
            raise ValueError(f"embedding dimension must be 1..{MAX_DIM} for a pgvector HNSW index, got {dim}")
        try:
            params = json.loads(meta.get("index_params") or "{}")
            m, efc = int(params.get("M", 16)), int(params.get("ef_construction", 64))
        except (TypeError, ValueError, AttributeError, RecursionError):
            m, efc = -1, -1
        if not (2 <= m <= 100 and 4 <= efc <= 1000):  # pgvector's own limits
            raise StoreError(f"the database at {self.location} holds a CHAI store whose index_params are "
                             f"{str(meta.get('index_params'))[:80]!r}, a value CHAI never writes; use another database")
        conn.execute(f"""CREATE TABLE IF NOT EXISTS chai_entities(
            label bigserial PRIMARY KEY,
            entry_id bigint NOT NULL REFERENCES chai_entries(id) ON DELETE CASCADE,
            compat_key text NOT NULL,
            text text NOT NULL,
            embedding vector({dim}) NOT NULL)""")
        conn.execute("CREATE INDEX IF NOT EXISTS chai_entities_by_entry ON chai_entities(entry_id)")
        conn.execute("CREATE INDEX IF NOT EXISTS chai_entities_by_key ON chai_entities(compat_key)")
        conn.execute(f"CREATE INDEX IF NOT EXISTS chai_entities_hnsw ON chai_entities USING hnsw "
                     f"(embedding vector_cosine_ops) WITH (m = {m}, ef_construction = {efc})")
        conn.execute("INSERT INTO chai_meta VALUES('dim', %s) ON CONFLICT (key) DO NOTHING", (str(dim),))

    def _upgrade_pg2(self, conn) -> None:
        """Turn a pg2 store into pg3 in place (the caller's transaction; every row kept): entries
        gain ``pinned`` (false) and ``thumbnail`` (NULL), the lookup log ``entry_id`` (NULL for the
        lookups logged before). A pg2 client then refuses the store ("schema 'pg3'").

        Raises:
            StoreError: this database user may not alter the tables (the message says who can).
        """
        import psycopg

        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITER_LOCK,))
        if conn.execute("SELECT value FROM chai_meta WHERE key='schema_version'").fetchone()[0] != _UPGRADABLE:
            return  # another client upgraded it while this one waited for the lock
        try:
            for statement in _UPGRADE_PG2:
                conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise StoreError(f"the store at {self.location} is of schema {_UPGRADABLE} and needs an upgrade to "
                             f"{SCHEMA_VERSION} (pins and thumbnails), which user {conn.info.user!r} may not make "
                             f"({_last_line(str(exc))}); let the owner of the chai_* tables open the store once") from None
        conn.execute("UPDATE chai_meta SET value=%s WHERE key='schema_version'", (SCHEMA_VERSION,))
        count = conn.execute("SELECT count(*) FROM chai_entries").fetchone()[0]
        conn.execute("INSERT INTO chai_events(time, kind, detail) VALUES(%s,%s,%s)",
                     (time.time(), "upgraded", f"schema {_UPGRADABLE} -> {SCHEMA_VERSION}: {count} entries kept"))
        self.notes.append(f"upgraded the store from schema {_UPGRADABLE} to {SCHEMA_VERSION}: every entry kept")
        log.warning("CHAI store %s: upgraded from schema %s to %s", self.location, _UPGRADABLE, SCHEMA_VERSION)

    @staticmethod
    def _pinned_bytes(conn) -> int:
        return int(conn.execute("SELECT coalesce(sum(nbytes), 0) FROM chai_entries WHERE pinned").fetchone()[0])

    def _check_budget_change(self, conn, budget: int, evict_to_fit: bool) -> None:
        """Refuse a budget below the pinned bytes, and one below what the store holds unless
        ``evict_to_fit`` (caller holds the writer lock).

        Raises:
            PinnedError: the pinned entries (never evicted) hold more than ``budget``, even with
                ``evict_to_fit``.
            BudgetError: saying how many entries and bytes the new budget would evict (policy order).
        """
        pinned = self._pinned_bytes(conn)
        if budget < pinned:
            raise PinnedError(
                f"a budget of {budget:,} bytes is smaller than the {pinned:,} bytes of the pinned entries of the store "
                f"{self.location}, which are never evicted. Nothing was changed: unpin entries first (`cache unpin "
                f"STORE ID`) or keep a budget of at least {pinned:,} bytes")
        held = self._counter(conn, "bytes_held")
        if held <= budget or evict_to_fit:
            return
        count, freed = 0, 0
        for (nbytes,) in conn.execute(f"SELECT nbytes FROM chai_entries WHERE NOT pinned "
                                      f"ORDER BY {self.config.policy.order_by}"):
            count, freed = count + 1, freed + int(nbytes)
            if freed >= held - budget:
                break
        raise budget_error(self.location, budget, held, count, freed, self.config.policy)

    def _apply_config(self, evict_to_fit: bool = False) -> None:
        """Persist an explicitly given budget / policy; a smaller budget evicts only with ``evict_to_fit``."""
        def apply(conn):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITER_LOCK,))
            if self._explicit_budget:
                self._check_budget_change(conn, self.config.budget_bytes, evict_to_fit)
                conn.execute("UPDATE chai_meta SET value=%s WHERE key='budget_bytes'", (str(self.config.budget_bytes),))
            if self._explicit_policy:
                conn.execute("UPDATE chai_meta SET value=%s WHERE key='policy'", (self.config.policy.value,))
            self._adopt_meta(conn)
            return self._evict_locked(conn, 0, exclude=None)

        self._delete_blobs(self._run(apply))

    def _adopt_meta(self, conn) -> None:
        rows = dict(conn.execute("SELECT key, left(value, 1000) FROM chai_meta "
                                 "WHERE key IN ('schema_version', 'store_id', 'budget_bytes', 'policy')").fetchall())
        meta = _parse_meta(rows, self.location)
        budget, policy = meta["budget_bytes"], meta["policy"]
        if budget != self.config.budget_bytes or policy != self.config.policy:
            self.config = replace(self.config, budget_bytes=budget, policy=policy)

    # ------------------------------------------------------------------ writes
    def put(self, tensors: Mapping[str, object], entities: Sequence[str], embeddings: np.ndarray, compat_key: str,
            prompt: str, info: Mapping | None = None, thumbnail: bytes | None = None) -> int:
        """Insert one entry (latents, entities and their embeddings, and its thumbnail) in one
        transaction, evicting unpinned entries by the policy so the byte budget holds. Same contract
        as :meth:`LatentStore.put`.

        Returns:
            The new entry id.

        Raises:
            ValueError: wrong tensors, mismatched entities/embeddings, an entry larger than the budget.
            StoreError: the store is closed, or the server stays unreachable past ``retry_seconds``.
        """
        entry = encode_entry(tensors, entities, embeddings, compat_key, prompt, self.dim)
        thumb = None if thumbnail is None else check_thumbnail(thumbnail)
        if self._closed:
            raise StoreError("the store is closed; open it again")
        info_json = json.dumps(dict(info or {}), sort_keys=True, default=str)
        check_entry_fits(entry.nbytes, self.budget_bytes)  # fail before writing; checked again under the lock
        uid = uuid.uuid4().hex
        spec_json = json.dumps(entry.spec)
        reserved = None
        if self.blobs is not None:
            # Object first, row second: a crash in between leaves an orphan object, which verify
            # collects. Its key comes from an id drawn now, so the row that follows owns it.
            reserved = int(self._run(lambda c: c.execute(
                "SELECT nextval(pg_get_serial_sequence('chai_entries', 'id'))").fetchone()[0], transaction=False))
            self.blobs.put(reserved, entry.blob)

        def insert(conn):
            row = conn.execute("SELECT id FROM chai_entries WHERE uid=%s", (uid,)).fetchone()
            if row is not None:  # an earlier attempt committed but its reply was lost
                return int(row[0]), []
            if self.dim is None:
                self._init_dim(conn, entry.embeddings.shape[1])
            conn.execute("INSERT INTO chai_partitions VALUES(%s, %s) ON CONFLICT DO NOTHING", (compat_key, spec_json))
            stored = conn.execute("SELECT tensor_spec FROM chai_partitions WHERE compat_key=%s", (compat_key,)).fetchone()
            if _loads(stored[0]) != entry.spec:
                raise spec_mismatch(entry.spec, _loads(stored[0]))
            now = time.time()
            entry_id = int(conn.execute(
                "INSERT INTO chai_entries(id, uid, compat_key, prompt, nbytes, sha256, created_at, last_access, info, "
                "blob, thumbnail) VALUES(coalesce(%s, nextval(pg_get_serial_sequence('chai_entries', 'id'))),"
                "%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) RETURNING id",
                (reserved, uid, compat_key, prompt, entry.nbytes, entry.sha256, now, now, info_json,
                 None if reserved else entry.blob, thumb)).fetchone()[0])
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO chai_entities(entry_id, compat_key, text, embedding) VALUES(%s,%s,%s,%s)",
                                [(entry_id, compat_key, t, v) for t, v in zip(entry.entities, entry.embeddings)])
            # The upload above ran outside the lock; from here to COMMIT writers are serial.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITER_LOCK,))
            self._adopt_meta(conn)
            check_entry_fits(entry.nbytes, self.config.budget_bytes)
            victims = self._evict_locked(conn, entry.nbytes, exclude=entry_id)
            self._bump(conn, bytes_held=entry.nbytes, inserts=1, generation=1)
            return entry_id, victims

        try:
            entry_id, victims = self._run(insert)
        except BaseException:
            if reserved is not None:
                self._delete_blobs([reserved])
            raise
        self._delete_blobs(victims)
        return entry_id

    def _init_dim(self, conn, dim: int) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITER_LOCK,))
        meta = dict(conn.execute("SELECT key, value FROM chai_meta").fetchall())
        if "dim" not in meta:
            self._create_entities(conn, dim, meta)
            meta["dim"] = str(dim)
        self.dim = int(meta["dim"])
        if self.dim != dim:
            raise ValueError(f"embeddings are {dim}-d but the store holds {self.dim}-d vectors")

    @staticmethod
    def _counter(conn, name: str) -> int:
        """A counter as a whole number >= 0 (a crafted NaN or negative value reads as 0)."""
        return int(count_value(conn.execute("SELECT value FROM chai_counters WHERE name=%s", (name,)).fetchone()[0]))

    @staticmethod
    def _bump(conn, **deltas: float) -> None:
        """Add to counters in one statement (rows locked in name order: no deadlock between clients)."""
        names = sorted(k for k, v in deltas.items() if v)
        if names:
            conn.execute("UPDATE chai_counters AS c SET value = c.value + d.delta FROM "
                         "unnest(%s::text[], %s::float8[]) AS d(name, delta) WHERE c.name = d.name",
                         (names, [float(deltas[n]) for n in names]))

    def _evict_locked(self, conn, incoming: int, exclude: int | None) -> list[int]:
        """Delete unpinned entries in policy order until ``held + incoming <= budget`` (caller holds
        the writer lock and adopted the persisted budget). Returns the deleted entry ids, whose
        bucket objects go after COMMIT.

        Raises:
            EntryTooLargeError: the incoming entry would fit only by evicting pinned entries (the
                caller's transaction, the insert with it, is rolled back).
        """
        budget = self.config.budget_bytes
        held = self._counter(conn, "bytes_held")
        excess = held + incoming - budget
        if excess <= 0:
            return []
        victims: list[tuple[int, int]] = []
        freed, offset, batch = 0, 0, 8
        order = self.config.policy.order_by
        while freed < excess:
            rows = conn.execute(f"SELECT id, nbytes FROM chai_entries WHERE id <> %s AND NOT pinned "
                                f"ORDER BY {order} LIMIT %s OFFSET %s", (exclude or 0, batch, offset)).fetchall()
            if not rows:
                break
            for entry_id, nbytes in rows:
                victims.append((int(entry_id), int(nbytes)))
                freed += int(nbytes)
                if freed >= excess:
                    break
            offset += len(rows)
            batch *= 4
        if freed < excess and incoming:
            pinned = self._pinned_bytes(conn)
            raise EntryTooLargeError(
                f"this entry is {incoming:,} bytes, but pinned entries hold {pinned:,} of the store {self.location}'s "
                f"{budget:,}-byte budget and are never evicted; it is not stored. Unpin entries (`cache unpin STORE "
                "ID`) or raise the budget", incoming, budget - pinned)
        conn.execute("DELETE FROM chai_entries WHERE id = ANY(%s)", ([v[0] for v in victims],))
        self._bump(conn, bytes_held=-freed, evictions=len(victims), generation=1)
        return [v[0] for v in victims]

    def _delete_blobs(self, entry_ids: Sequence[int]) -> None:
        """Delete the bucket objects of entries whose rows are gone (nothing for bytea latents)."""
        if entry_ids and self.blobs is not None:
            try:
                self.blobs.delete(entry_ids)
            except Exception as exc:  # the rows are gone; verify collects what is left
                log.warning("CHAI store %s: could not delete %d blob(s) (%s); 'cache verify' removes them later",
                            self.location, len(entry_ids), exc)

    def set_budget(self, budget_bytes: int, evict_to_fit: bool = False) -> int:
        """Change the byte budget (persisted, seen by every client's next insert).

        A budget below what the store holds is refused unless ``evict_to_fit``; then saving it and
        evicting down to it happen in one transaction (the folder store's rule, issue 14).

        Returns:
            The number of entries evicted.

        Raises:
            ValueError: budget <= 0.
            BudgetError: the store holds more than ``budget_bytes`` and ``evict_to_fit`` is False;
                nothing is changed.
        """
        validate_budget(budget_bytes)

        def apply(conn):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITER_LOCK,))
            self._check_budget_change(conn, int(budget_bytes), evict_to_fit)
            conn.execute("UPDATE chai_meta SET value=%s WHERE key='budget_bytes'", (str(int(budget_bytes)),))
            self._adopt_meta(conn)
            return self._evict_locked(conn, 0, exclude=None)

        victims = self._run(apply)
        self._delete_blobs(victims)
        return len(victims)

    def delete(self, entry_ids: Sequence[int], reason: str = "deleted") -> int:
        """Remove entries (rows, vectors and latents). Unknown ids are ignored.

        Returns:
            The number of entries removed.
        """
        ids = [int(i) for i in entry_ids]

        def remove(conn):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITER_LOCK,))
            rows = conn.execute("DELETE FROM chai_entries WHERE id = ANY(%s) RETURNING id, nbytes", (ids,)).fetchall()
            if rows:
                self._bump(conn, bytes_held=-sum(int(r[1]) for r in rows), generation=1)
            return [int(r[0]) for r in rows]

        removed = self._run(remove)
        self._delete_blobs(removed)
        return len(removed)

    def pin(self, entry_id: int, pinned: bool = True) -> bool:
        """Pin an entry (never evicted; its bytes still count against the budget) or unpin it.

        Returns:
            True when the entry exists (its flag is now ``pinned``), False for an unknown id.
        """
        def apply(conn):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITER_LOCK,))
            found = conn.execute("UPDATE chai_entries SET pinned=%s WHERE id=%s",
                                 (bool(pinned), int(entry_id))).rowcount
            if found:
                conn.execute("INSERT INTO chai_events(time, kind, detail) VALUES(%s,%s,%s)",
                             (time.time(), "pinned" if pinned else "unpinned", f"entry {int(entry_id)}"))
            return bool(found)

        return self._run(apply)

    def thumbnail(self, entry_id: int) -> bytes | None:
        """The entry's thumbnail (JPEG or PNG bytes, at most ``MAX_THUMBNAIL_BYTES``), or None when
        it has none or is gone. The size is checked on the server before the bytes leave it, the
        signature here, so a crafted row never yields more than the cap or bytes of another kind."""
        row = self._run(lambda c: c.execute(
            "SELECT CASE WHEN octet_length(thumbnail) <= %s THEN thumbnail END FROM chai_entries WHERE id=%s",
            (MAX_THUMBNAIL_BYTES, int(entry_id))).fetchone(), transaction=False)
        if row is None or row[0] is None:
            return None
        try:
            return check_thumbnail(row[0])
        except ValueError:
            return None

    # ------------------------------------------------------------------ reads
    def search(self, vectors: np.ndarray, compat_key: str, k: int = 8) -> list[EntityMatch]:
        """k nearest stored entities (cosine, pgvector HNSW) of each query vector among entries of
        ``compat_key``, in one round trip.

        Args:
            vectors: [m, dim] float32 query embeddings.
            compat_key: only entries stored under this key are candidates.
            k: neighbours per query vector.

        Returns:
            Matches sorted by similarity descending (several per query vector possible).
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if self.dim is None:
            self._reload_dim()
            if self.dim is None:
                return []
        if vectors.shape[1] != self.dim:
            raise ValueError(f"query vectors are {vectors.shape[1]}-d but the store holds {self.dim}-d vectors")
        rows = self._run(lambda c: c.execute(
            f"SELECT q.i - 1, e.label, e.entry_id, left(e.text, {_MAX_TEXT}), 1 - (e.embedding <=> q.v) FROM "
            "unnest(%b::vector[]) WITH ORDINALITY AS q(v, i) CROSS JOIN LATERAL ("
            "SELECT label, entry_id, text, embedding FROM chai_entities WHERE compat_key = %s "
            "ORDER BY embedding <=> q.v LIMIT %s) e",
            (list(vectors), compat_key, int(k))).fetchall(), transaction=False)
        matches = [EntityMatch(int(label), int(entry_id), text, float(sim), int(qi))
                   for qi, label, entry_id, text, sim in rows]
        matches.sort(key=lambda m: -m.similarity)
        return matches

    def _reload_dim(self) -> None:
        row = self._run(lambda c: c.execute("SELECT left(value, 10) FROM chai_meta WHERE key='dim'").fetchone(),
                        transaction=False)
        if row is not None:
            self.dim = _parse_dim(row[0], self.location)

    def load(self, entry_id: int, device: str = "cpu") -> dict | None:
        """An entry's latents after the folder store's checks: the recorded size (compared before a
        byte is sent: ``octet_length`` for ``bytea``, ``Content-Length`` for a bucket object), at most
        ``MAX_ENTRY_BYTES``, the SHA-256, and a safetensors header that describes exactly the tensors
        of the entry's key (dtype, shape, offsets) before any tensor is built. A bad entry is
        quarantined (row moved to ``chai_quarantine``, reported) and ``None`` returned (a miss).

        Returns:
            name -> torch tensor (dtype as stored), or None when the entry is gone or invalid.
        """
        row = self._run(lambda c: c.execute(_LATENT_QUERY, (MAX_ENTRY_BYTES, int(entry_id)), binary=True).fetchone(),
                        transaction=False)
        if row is None:
            return None
        try:
            return decode_latents(self._checked_latents(int(entry_id), *row), device)
        except BlobError as exc:
            self._quarantine(int(entry_id), str(exc))
            return None

    def _checked_latents(self, entry_id: int, nbytes, digest, spec_text, size, blob) -> bytes:
        """An entry's latent bytes from a row of :data:`_LATENT_QUERY`, checked (see :meth:`load`).

        Raises:
            BlobError: naming the first check that failed.
        """
        if not (isinstance(nbytes, int) and 0 < nbytes <= MAX_ENTRY_BYTES):
            raise BlobError(f"the row records {nbytes} bytes of latents, outside 1..{MAX_ENTRY_BYTES}")
        if self.blobs is not None:
            blob = self.blobs.get(entry_id, nbytes)
        elif size is None:
            raise BlobError("latents are missing")
        elif size != nbytes or blob is None:
            raise BlobError(f"latents are {size} bytes, the row recorded {nbytes}")
        blob = bytes(blob)
        if hashlib.sha256(blob).hexdigest() != digest:
            raise BlobError("latents do not match their recorded SHA-256")
        try:
            spec = parse_tensor_spec(spec_text)
        except ValueError as exc:
            raise BlobError(f"the tensor spec of the entry's key is not CHAI's ({exc})") from None
        check_safetensors(blob, spec)
        return blob

    def _size_problem(self, entry_id: int, nbytes, size) -> str | None:
        """Why an entry's latents are not of its recorded size (no byte read), or None."""
        if not (isinstance(nbytes, int) and 0 < nbytes <= MAX_ENTRY_BYTES):
            return f"the row records {nbytes} bytes of latents, outside 1..{MAX_ENTRY_BYTES}"
        if self.blobs is not None:
            size = self.blobs.size(entry_id)
            if size is None:
                return f"latent object {self.blobs.key(entry_id)} is missing"
        if size is None:
            return "latents are missing"
        if int(size) != nbytes:
            return f"latents are {size} bytes, the row recorded {nbytes}"
        return None

    def _quarantine(self, entry_id: int, reason: str) -> None:
        """Move an entry's row (and bytea latents, server side) to ``chai_quarantine``; a bucket
        object stays at its key, which the quarantine row keeps from orphan collection."""
        def move(conn):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITER_LOCK,))
            row = conn.execute(
                "WITH gone AS (DELETE FROM chai_entries WHERE id=%s RETURNING id, nbytes, blob), "
                "kept AS (INSERT INTO chai_quarantine(entry_id, time, reason, blob) SELECT id, %s, %s, blob FROM gone) "
                "SELECT nbytes FROM gone", (entry_id, time.time(), reason)).fetchone()
            if row is None:
                return False
            self._bump(conn, bytes_held=-int(row[0]), quarantined=1, repairs=1, generation=1)
            self._event(conn, "quarantined", f"entry {entry_id}: {reason}")
            return True

        self._run(move)

    def _event(self, conn, kind: str, detail: str) -> None:
        conn.execute("INSERT INTO chai_events(time, kind, detail) VALUES(%s, %s, %s)", (time.time(), kind, detail))
        self.open_report.append(f"{kind}: {detail}")
        log.warning("CHAI store %s: %s: %s", self.location, kind, detail)

    def entry(self, entry_id: int) -> EntryRecord | None:
        """The record of one entry, or None."""
        rows = self._records("WHERE e.id = %s", (int(entry_id),))
        return rows[0] if rows else None

    def entries(self) -> list[EntryRecord]:
        """Every entry, oldest first."""
        return self._records("", ())

    def most_used(self, limit: int = 8) -> list[EntryRecord]:
        """The ``limit`` entries served most often (``access_count``; ties: the most recently used first)."""
        rows = self._records("WHERE e.id IN (SELECT id FROM chai_entries ORDER BY access_count DESC, last_access DESC, "
                             "id DESC LIMIT %s)", (max(0, int(limit)),))
        return sorted(rows, key=lambda r: (-r.access_count, -r.last_access, -r.entry_id))

    def _records(self, where: str, params: tuple) -> list[EntryRecord]:
        has_entities = self.dim is not None
        # Bounded on the server: a row from elsewhere cannot make a client read a huge prompt or list.
        texts = (f"(SELECT coalesce(array_agg(t ORDER BY label), '{{}}') FROM (SELECT label, left(text, {_MAX_TEXT}) "
                 f"AS t FROM chai_entities WHERE entry_id = e.id ORDER BY label LIMIT {_MAX_ENTITIES}) AS x)"
                 if has_entities else "'{}'::text[]")
        rows = self._run(lambda c: c.execute(
            f"SELECT e.id, left(e.compat_key, {_MAX_TEXT}), left(e.prompt, {_MAX_PROMPT}), e.nbytes, e.created_at, "
            f"e.last_access, e.access_count, CASE WHEN octet_length(e.info) <= {_MAX_INFO} THEN e.info END, "
            f"{texts}, e.pinned, e.thumbnail IS NOT NULL FROM chai_entries e {where} ORDER BY e.id",
            params).fetchall(), transaction=False)
        records = []
        for r in rows:
            info = _loads(r[7])
            records.append(EntryRecord(int(r[0]), r[1], r[2], list(r[8]), int(r[3]), float(r[4]), float(r[5]),
                                       int(r[6]), info if isinstance(info, dict) else {}, bool(r[9]), bool(r[10])))
        return records

    def entity_vectors(self, entry_ids: Sequence[int]) -> dict[int, np.ndarray]:
        """entry id -> [n, dim] float32 embeddings of its entities, in the order of
        :meth:`entry`'s ``entities`` (for copying entries to another store). Unknown ids are left out."""
        if self.dim is None:
            return {}
        rows = self._run(lambda c: c.execute(
            "SELECT entry_id, embedding FROM chai_entities WHERE entry_id = ANY(%s) ORDER BY label",
            ([int(i) for i in entry_ids],), binary=True).fetchall(), transaction=False)
        out: dict[int, list] = {}
        for entry_id, vec in rows:
            out.setdefault(int(entry_id), []).append(vec.to_numpy().astype(np.float32))
        return {k: np.stack(v) for k, v in out.items()}

    def __len__(self) -> int:
        return int(self._run(lambda c: c.execute("SELECT count(*) FROM chai_entries").fetchone()[0], transaction=False))

    @property
    def generation(self) -> int:
        """Store generation: changes whenever an entry is inserted, evicted or removed."""
        return int(self._run(lambda c: c.execute(
            "SELECT value FROM chai_counters WHERE name='generation'").fetchone()[0], transaction=False))

    def record_lookup(self, prompt: str, query_entities: Sequence[str], hit_entry: int | None, entity: str | None,
                      matched: str | None, similarity: float | None, ms: float) -> None:
        """Count one lookup (hit/miss counters, entity frequencies, the lookup log, and the served
        entry's recency and frequency, which LRU and LFU order by) in one transaction."""
        now = time.time()
        hit = hit_entry is not None
        texts = sorted(set(query_entities))  # sorted: rows locked in one order by every client

        prune = random.random() < 0.01  # keep the log near LOOKUP_LOG_KEEP rows, pruning now and then

        def record(conn):
            # One pipeline: every statement and the COMMIT go in one round trip. Statistics need no
            # WAL flush before returning: a crash may lose the last moment's counts, never corrupts.
            with conn.pipeline(), conn.transaction():
                conn.execute("SET LOCAL synchronous_commit TO OFF")
                if hit:
                    conn.execute("UPDATE chai_entries SET last_access=%s, access_count=access_count+1 WHERE id=%s",
                                 (now, int(hit_entry)))
                self._bump(conn, lookups=1, hits=int(hit), misses=int(not hit), lookup_ms_sum=float(ms))
                if texts:
                    conn.execute("INSERT INTO chai_entity_counts SELECT t, 1 FROM unnest(%s::text[]) AS t "
                                 "ON CONFLICT (text) DO UPDATE SET count = chai_entity_counts.count + 1", (texts,))
                conn.execute("INSERT INTO chai_lookup_log(time, prompt, hit, entity, matched, similarity, ms, entry_id) "
                             "VALUES(%s,%s,%s,%s,%s,%s,%s,%s)",
                             (now, prompt[:500], hit, entity, matched, similarity, float(ms),
                              int(hit_entry) if hit else None))
                if prune:
                    conn.execute("DELETE FROM chai_lookup_log WHERE id < (SELECT max(id) FROM chai_lookup_log) - %s",
                                 (LOOKUP_LOG_KEEP,))

        self._run(record, transaction=False)

    def stats(self, last: int = 10) -> StoreStats:
        """Counters, sizes and recent lookups (see :class:`StoreStats`)."""
        if self.dim is None:
            self._reload_dim()
        has_entities = self.dim is not None

        def snapshot(conn):
            # One snapshot: REPEATABLE READ makes every query of the report see the same state.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            meta = _parse_meta(dict(conn.execute("SELECT key, left(value, 1000) FROM chai_meta").fetchall()),
                               self.location)
            counters = {k: count_value(v) for k, v in conn.execute("SELECT name, value FROM chai_counters").fetchall()}
            entries, held, pinned_entries, pinned_bytes = conn.execute(
                "SELECT count(*), coalesce(sum(nbytes), 0), count(*) FILTER (WHERE pinned), "
                "coalesce(sum(nbytes) FILTER (WHERE pinned), 0) FROM chai_entries").fetchone()
            n_entities = conn.execute("SELECT count(*) FROM chai_entities").fetchone()[0] if has_entities else 0
            ms = [r[0] for r in conn.execute("SELECT ms FROM chai_lookup_log WHERE ms >= 0 AND ms < 'Infinity' "
                                             "ORDER BY id DESC LIMIT %s",
                                             (LOOKUP_LOG_KEEP,))]
            top = [(t, int(n)) for t, n in conn.execute(
                "SELECT left(text, %s), count FROM chai_entity_counts ORDER BY count DESC, text ASC LIMIT 10",
                (_MAX_TEXT,))]
            recent = [dict(zip(("time", "prompt", "hit", "entity", "matched", "similarity", "ms", "entry_id"), r))
                      for r in conn.execute("SELECT time, left(prompt, 500), hit, left(entity, %s), left(matched, %s), "
                                            "similarity, ms, entry_id FROM chai_lookup_log ORDER BY id DESC LIMIT %s",
                                            (_MAX_TEXT, _MAX_TEXT, min(int(last), LOOKUP_LOG_KEEP)))]
            pins = (int(pinned_entries), int(pinned_bytes))
            return meta, counters, int(entries), int(held), int(n_entities), ms, top, recent, pins

        meta, counters, entries, held, n_entities, ms, top, recent, pins = self._run(snapshot)
        lookups = int(counters.get("lookups", 0))
        stats = StoreStats(
            entries=entries, entities=n_entities, bytes=held, budget_bytes=meta["budget_bytes"],
            hits=int(counters.get("hits", 0)), misses=int(counters.get("misses", 0)), lookups=lookups,
            evictions=int(counters.get("evictions", 0)), inserts=int(counters.get("inserts", 0)),
            repairs=int(counters.get("repairs", 0)), quarantined=int(counters.get("quarantined", 0)),
            hit_rate=(counters.get("hits", 0) / lookups) if lookups else 0.0,
            lookup_ms_mean=float(np.mean(ms)) if ms else 0.0,
            lookup_ms_p50=float(np.percentile(ms, 50)) if ms else 0.0,
            lookup_ms_p99=float(np.percentile(ms, 99)) if ms else 0.0,
            top_entities=top, last_lookups=recent, generation=int(counters.get("generation", 0)),
            policy=meta["policy"].value, pinned_entries=pins[0], pinned_bytes=pins[1])
        self.config = replace(self.config, budget_bytes=stats.budget_bytes, policy=meta["policy"])
        return stats

    def events(self, limit: int = 50) -> list[dict]:
        """The newest repair / quarantine events: dicts with time, kind, detail."""
        rows = self._run(lambda c: c.execute("SELECT time, kind, detail FROM chai_events ORDER BY id DESC LIMIT %s",
                                             (int(limit),)).fetchall(), transaction=False)
        return [dict(zip(("time", "kind", "detail"), r)) for r in rows]

    # ------------------------------------------------------------------ maintenance
    def verify(self, full: bool = True, orphan_grace_s: float = 3600.0) -> VerifyReport:
        """Check every entry's latents (size; and, when ``full``, everything :meth:`load` checks),
        the byte counter, the HNSW index and, with a bucket, objects without a row; repair what is
        wrong (quarantine, recount, rebuild, delete orphans older than ``orphan_grace_s``, which an
        insert still in flight may own). Bucket objects not of the store's naming are listed in
        ``left_alone`` and never touched.

        Returns:
            A :class:`VerifyReport`; ``report.ok`` is True when nothing needed repair.
        """
        report = VerifyReport()
        last = 0
        while True:
            rows = self._run(lambda c: c.execute(
                "SELECT id, nbytes, octet_length(blob) FROM chai_entries WHERE id > %s ORDER BY id LIMIT 1000",
                (last,)).fetchall(), transaction=False)
            if not rows:
                break
            for entry_id, nbytes, size in rows:
                last = entry_id = int(entry_id)
                report.entries_checked += 1
                problem = self._size_problem(entry_id, nbytes, size)
                if problem is None and full:  # one entry's bytes at a time
                    row = self._run(lambda c: c.execute(_LATENT_QUERY, (MAX_ENTRY_BYTES, entry_id),
                                                        binary=True).fetchone(), transaction=False)
                    if row is None:  # deleted meanwhile by another client
                        continue
                    try:
                        decode_latents(self._checked_latents(entry_id, *row))
                    except BlobError as exc:
                        problem = str(exc)
                if problem:
                    report.problems.append(f"entry {entry_id}: {problem}")
                    report.files_quarantined.append(str(entry_id))
                    self._quarantine(entry_id, problem)

        def recount(conn):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITER_LOCK,))
            held = int(conn.execute("SELECT coalesce(sum(nbytes), 0) FROM chai_entries").fetchone()[0])
            counted = self._counter(conn, "bytes_held")
            if held != counted:
                conn.execute("UPDATE chai_counters SET value=%s WHERE name='bytes_held'", (held,))
                self._event(conn, "recounted", f"byte counter said {counted}, the entries hold {held}")
            return held, counted

        held, counted = self._run(recount)
        if held != counted:
            report.problems.append(f"byte counter said {counted}, the entries hold {held}")
        if self.dim is not None:
            valid = self._run(lambda c: c.execute(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE c.relname = 'chai_entities_hnsw'").fetchone(), transaction=False)
            if valid is None or not valid[0]:
                report.problems.append("HNSW index chai_entities_hnsw is missing or invalid")
                report.partitions_rebuilt.append("chai_entities_hnsw")
                self._rebuild_index(missing=valid is None)
        if self.blobs is not None:
            objects, others = self.blobs.scan()
            known = set(r[0] for r in self._run(lambda c: c.execute(
                "SELECT id FROM chai_entries UNION SELECT entry_id FROM chai_quarantine").fetchall(), transaction=False))
            cutoff = time.time() - orphan_grace_s
            orphans = [entry_id for entry_id, modified in objects if entry_id not in known and modified < cutoff]
            if orphans:
                self.blobs.delete(orphans)
                report.orphans_removed.extend(self.blobs.key(i) for i in orphans)
                report.problems.append(f"{len(orphans)} latent object(s) without an entry (interrupted inserts)")
            report.left_alone.extend(others)
        return report

    def _rebuild_index(self, missing: bool) -> None:
        def rebuild(conn):
            if missing:
                meta = dict(conn.execute("SELECT key, value FROM chai_meta").fetchall())
                self._create_entities(conn, int(meta["dim"]), meta)
            else:
                conn.execute("REINDEX INDEX chai_entities_hnsw")
            self._bump(conn, repairs=1)
            self._event(conn, "index_rebuilt", "HNSW index chai_entities_hnsw was missing or invalid; rebuilt")

        self._run(rebuild)

    def compact(self) -> dict:
        """Rebuild the HNSW index without the dead tuples of evicted entries (``REINDEX ...
        CONCURRENTLY``: lookups keep running) and vacuum the tables.

        Returns:
            {"partitions": compatibility keys, "tombstones_removed": dead entity rows, "vectors": live vectors}.
        """
        if self.dim is None:
            return {"partitions": 0, "tombstones_removed": 0, "vectors": 0}

        def work(conn):
            dead = conn.execute("SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables "
                                "WHERE relname = 'chai_entities'").fetchone()
            conn.execute("VACUUM (ANALYZE) chai_entities")
            conn.execute("VACUUM (ANALYZE) chai_entries")
            conn.execute("REINDEX INDEX CONCURRENTLY chai_entities_hnsw")
            keys, vectors = conn.execute("SELECT count(DISTINCT compat_key), count(*) FROM chai_entities").fetchone()
            return {"partitions": int(keys), "tombstones_removed": int(dead[0]) if dead else 0, "vectors": int(vectors)}

        return self._run(work, transaction=False)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close every connection this store opened. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._conns_lock:
            for conn in self._conns:
                try:
                    conn.close()
                except Exception:
                    pass
            self._conns.clear()
        self._local = threading.local()

    def __enter__(self) -> "PostgresStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- factory hooks
_STORE_OPTIONS = ("blobs", "retry_seconds", "connect_timeout")


def open_location(location: str, *, budget_bytes: int | None = None, policy: str | None = None,
                  dim: int | None = None, create: bool = True, options: Mapping | None = None,
                  evict_to_fit: bool = False) -> PostgresStore:
    """Open the store at a ``postgresql://`` URL (the factory's signature).

    Args:
        options: :class:`StoreConfig` fields (``durable``, ``index_ef_search``, ...) plus ``blobs``,
            ``retry_seconds`` and ``connect_timeout`` of :class:`PostgresStore`.

    Raises:
        StoreError: see :class:`PostgresStore`; with ``create=False``, no store in that database.
        ValueError: an unknown option, a bad budget or policy.
    """
    options = dict(options or {})
    extra = {k: options.pop(k) for k in _STORE_OPTIONS if k in options}
    if not create and not location_exists(location):
        raise StoreError(f"the database at {location} holds no CHAI store; check the URL, or create the store "
                         "by running a request with it")
    known = {f.name for f in fields(StoreConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown PostgreSQL store option(s) {unknown}; use {sorted(known | set(_STORE_OPTIONS))}")
    config = StoreConfig(**options) if options else None
    return PostgresStore(location, config=config, dim=dim, budget_bytes=budget_bytes, policy=policy,
                         config_is_default=True, evict_to_fit=evict_to_fit, **extra)


def location_exists(location: str) -> bool:
    """True when the database at ``location`` holds a CHAI store (nothing is created).

    Raises:
        StoreError: bad URL or server unreachable (the message says what to do).
    """
    import psycopg

    _parse_url(location)
    try:
        with psycopg.connect(location.strip(), autocommit=True, connect_timeout=10) as conn:
            return bool(conn.execute("SELECT to_regclass('chai_meta') IS NOT NULL").fetchone()[0])
    except psycopg.OperationalError as exc:
        raise _connect_error(exc, location) from None


def read_location_stats(location: str, last: int = 10) -> StoreStats:
    """Statistics of the store at ``location``; nothing is created or repaired.

    Raises:
        StoreError: no store there, bad URL, server unreachable.
    """
    with open_location(location, create=False) as store:
        return store.stats(last=last)
