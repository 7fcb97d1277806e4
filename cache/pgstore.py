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
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
import uuid
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

import numpy as np

from .policy import EvictionPolicy
from dataclasses import replace as _replace

from .store import (
    LOOKUP_LOG_KEEP,
    EntityMatch,
    EntryRecord,
    StoreConfig,
    StoreError,
    StoreStats,
    VerifyReport,
    _tensor_spec,
)
from .store_budget import validate_budget as _validate_budget
from .store_types import BudgetError

__all__ = ["PostgresStore", "is_postgres_url", "open_location", "read_location_stats", "location_exists",
           "SCHEMA_VERSION"]

log = logging.getLogger("comfyui_chai.pgstore")

SCHEMA_VERSION = "pg1"
MIN_PGVECTOR = (0, 5, 0)  # HNSW indexes
_COUNTERS = ("hits", "misses", "lookups", "evictions", "inserts", "repairs", "quarantined", "lookup_ms_sum",
             "bytes_held", "generation")
# One writer lock per database: pg_advisory_xact_lock(key), key = first 8 bytes of a hash.
_WRITER_LOCK = int.from_bytes(hashlib.sha256(b"comfyui-chai latent store writer").digest()[:8], "big", signed=True)
_T = TypeVar("_T")

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
        blob_key text)""",
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
        entity text, matched text, similarity double precision, ms double precision NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS chai_events(
        id bigserial PRIMARY KEY, time double precision NOT NULL, kind text NOT NULL, detail text NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS chai_quarantine(
        entry_id bigint NOT NULL, time double precision NOT NULL, reason text NOT NULL, blob bytea, blob_key text)""",
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


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\t", " ").splitlines() if ln.strip()]
    line = lines[0] if lines else text
    return line.split("failed: ", 1)[-1] if "failed: " in line else line


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
            base = _replace(base, budget_bytes=budget_bytes)
        if policy is not None:
            base = _replace(base, policy=EvictionPolicy.parse(policy))
        _validate_budget(base.budget_bytes)
        self.config = _replace(base, policy=EvictionPolicy.parse(base.policy))
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
        self.notes: list[str] = []  # nothing to upgrade yet: one schema version
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
        self.config = _replace(self.config, policy=parsed)

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
                meta = dict(conn.execute("SELECT key, value FROM chai_meta").fetchall())
                if not meta:
                    # A new store's bucket is checked first: failing here rolls everything back.
                    given_blobs = open_blob_store(blobs) if blobs else None
                    rows = {"schema_version": SCHEMA_VERSION, "budget_bytes": str(self.config.budget_bytes),
                            "policy": self.config.policy.value, "blobs": blobs or "",
                            "index_params": json.dumps({"M": self.config.index_M,
                                                        "ef_construction": self.config.index_ef_construction})}
                    for key, value in rows.items():
                        conn.execute("INSERT INTO chai_meta VALUES(%s, %s)", (key, value))
                    for name in _COUNTERS:
                        conn.execute("INSERT INTO chai_counters VALUES(%s, 0) ON CONFLICT DO NOTHING", (name,))
                    meta = rows
                if meta.get("schema_version") != SCHEMA_VERSION:
                    raise StoreError(f"the database at {self.location} holds a CHAI store of schema "
                                     f"{meta.get('schema_version')!r}, not {SCHEMA_VERSION!r}; use the pack version "
                                     "that created it or another database")
                if dim is not None and "dim" not in meta:
                    self._create_entities(conn, int(dim), meta)
                    meta["dim"] = str(int(dim))
        except psycopg.errors.InsufficientPrivilege as exc:
            raise StoreError(f"user {conn.info.user!r} may not create or use the CHAI tables in {self.location} "
                             f"({_last_line(str(exc))}); let the database owner open the store once, then grant "
                             "this user SELECT, INSERT, UPDATE, DELETE on the chai_* tables and USAGE on their "
                             "sequences") from None
        stored = int(meta["dim"]) if "dim" in meta else None
        if dim is not None and stored is not None and int(dim) != stored:
            raise StoreError(f"store {self.location} holds {stored}-d embeddings but the embedder gives {dim}-d; "
                             "use the embedder the store was built with, or another database")
        self.dim = stored
        if blobs and meta.get("blobs") != blobs:
            raise StoreError(f"store {self.location} keeps its latents in {meta.get('blobs') or 'the database'}, "
                             f"not {blobs}; leave the blob option out or use another database")
        if meta.get("blobs"):
            self.blobs = given_blobs or open_blob_store(meta["blobs"])

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
        if not 1 <= dim <= 2000:
            raise ValueError(f"embedding dimension must be 1..2000 for a pgvector HNSW index, got {dim}")
        params = json.loads(meta.get("index_params") or "{}")
        conn.execute(f"""CREATE TABLE IF NOT EXISTS chai_entities(
            label bigserial PRIMARY KEY,
            entry_id bigint NOT NULL REFERENCES chai_entries(id) ON DELETE CASCADE,
            compat_key text NOT NULL,
            text text NOT NULL,
            embedding vector({dim}) NOT NULL)""")
        conn.execute("CREATE INDEX IF NOT EXISTS chai_entities_by_entry ON chai_entities(entry_id)")
        conn.execute("CREATE INDEX IF NOT EXISTS chai_entities_by_key ON chai_entities(compat_key)")
        conn.execute(f"CREATE INDEX IF NOT EXISTS chai_entities_hnsw ON chai_entities USING hnsw "
                     f"(embedding vector_cosine_ops) WITH (m = {int(params.get('M', 16))}, "
                     f"ef_construction = {int(params.get('ef_construction', 64))})")
        conn.execute("INSERT INTO chai_meta VALUES('dim', %s) ON CONFLICT (key) DO NOTHING", (str(dim),))

    def _check_budget_change(self, conn, budget: int, evict_to_fit: bool) -> None:
        """Refuse a budget below what the store holds unless ``evict_to_fit`` (caller holds the writer lock).

        Raises:
            BudgetError: saying how many entries and bytes the new budget would evict (policy order).
        """
        held = int(conn.execute("SELECT value FROM chai_counters WHERE name='bytes_held'").fetchone()[0])
        if held <= budget or evict_to_fit:
            return
        count, freed = 0, 0
        for (nbytes,) in conn.execute(f"SELECT nbytes FROM chai_entries ORDER BY {self.config.policy.order_by}"):
            count, freed = count + 1, freed + int(nbytes)
            if freed >= held - budget:
                break
        raise BudgetError(
            f"the store {self.location} holds {held:,} bytes; a budget of {budget:,} bytes would evict {count} "
            f"entries ({freed:,} bytes, {self.config.policy.value} order). Nothing was changed: confirm with "
            "--evict-to-fit (the CHAI Cache node's evict_to_fit option, or evict_to_fit=True), or keep a larger "
            "budget", budget, held, count, freed)

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
        rows = dict(conn.execute("SELECT key, value FROM chai_meta WHERE key IN ('budget_bytes', 'policy')").fetchall())
        budget, policy = int(rows["budget_bytes"]), EvictionPolicy.parse(rows["policy"])
        if budget != self.config.budget_bytes or policy != self.config.policy:
            self.config = _replace(self.config, budget_bytes=budget, policy=policy)

    # ------------------------------------------------------------------ writes
    def put(self, tensors: Mapping[str, object], entities: Sequence[str], embeddings: np.ndarray, compat_key: str,
            prompt: str, info: Mapping | None = None) -> int:
        """Insert one entry (latents, entities and their embeddings) in one transaction, evicting
        by the policy so the byte budget holds. Same contract as :meth:`LatentStore.put`.

        Returns:
            The new entry id.

        Raises:
            ValueError: wrong tensors, mismatched entities/embeddings, an entry larger than the budget.
            StoreError: the store is closed, or the server stays unreachable past ``retry_seconds``.
        """
        from safetensors.torch import save

        if not compat_key or not isinstance(compat_key, str):
            raise ValueError("compat_key must be a non-empty string")
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a string")
        spec = _tensor_spec(tensors)
        if isinstance(entities, (str, bytes)):
            raise ValueError("entities must be a list of strings, e.g. ['a golden retriever'], not one string")
        entities = [str(e) for e in entities]
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if not entities:
            raise ValueError("an entry needs at least one entity to be found by")
        if embeddings.ndim != 2 or embeddings.shape[0] != len(entities):
            raise ValueError(f"embeddings must be [{len(entities)}, dim], got {list(embeddings.shape)}")
        if not np.isfinite(embeddings).all():
            raise ValueError("embeddings contain NaN or Inf")
        if self.dim is not None and embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings are {embeddings.shape[1]}-d but the store holds {self.dim}-d vectors")
        if self._closed:
            raise StoreError("the store is closed; open it again")
        info_json = json.dumps(dict(info or {}), sort_keys=True, default=str)
        blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                    metadata={"compat_key": compat_key[:512]})
        nbytes = len(blob)
        self._check_fits(nbytes)
        digest = hashlib.sha256(blob).hexdigest()
        uid = uuid.uuid4().hex
        blob_key = None
        if self.blobs is not None:  # object first, row second: a crash in between leaves an orphan object
            blob_key = self.blobs.put(f"{uid}.safetensors", blob)
        spec_json = json.dumps(spec)

        def insert(conn):
            row = conn.execute("SELECT id FROM chai_entries WHERE uid=%s", (uid,)).fetchone()
            if row is not None:  # an earlier attempt committed but its reply was lost
                return int(row[0]), []
            if self.dim is None:
                self._init_dim(conn, embeddings.shape[1])
            conn.execute("INSERT INTO chai_partitions VALUES(%s, %s) ON CONFLICT DO NOTHING", (compat_key, spec_json))
            stored = conn.execute("SELECT tensor_spec FROM chai_partitions WHERE compat_key=%s", (compat_key,)).fetchone()
            if json.loads(stored[0]) != spec:
                raise ValueError(f"entry tensors {spec} differ from those already stored under this key "
                                 f"{json.loads(stored[0])}; the compatibility key must include the latent shape and dtype")
            now = time.time()
            entry_id = int(conn.execute(
                "INSERT INTO chai_entries(uid, compat_key, prompt, nbytes, sha256, created_at, last_access, info, "
                "blob, blob_key) VALUES(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) RETURNING id",
                (uid, compat_key, prompt, nbytes, digest, now, now, info_json,
                 None if blob_key else blob, blob_key)).fetchone()[0])
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO chai_entities(entry_id, compat_key, text, embedding) VALUES(%s,%s,%s,%s)",
                                [(entry_id, compat_key, t, v) for t, v in zip(entities, embeddings)])
            # The upload above ran outside the lock; from here to COMMIT writers are serial.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITER_LOCK,))
            budget = self._budget_locked(conn, nbytes)
            victims = self._evict_locked(conn, nbytes, exclude=entry_id, budget=budget)
            self._bump(conn, bytes_held=nbytes, inserts=1, generation=1)
            return entry_id, victims

        try:
            entry_id, victims = self._run(insert)
        except BaseException:
            if blob_key is not None:
                self._delete_blobs([blob_key])
            raise
        self._delete_blobs(victims)
        return entry_id

    def _check_fits(self, nbytes: int) -> None:
        budget = int(self._run(lambda c: c.execute("SELECT value FROM chai_meta WHERE key='budget_bytes'").fetchone()[0],
                               transaction=False))
        if nbytes > budget:
            raise ValueError(f"this entry is {nbytes} bytes, more than the store's whole budget of {budget} bytes; "
                             "raise the budget (budget_bytes / --budget-mb)")

    def _budget_locked(self, conn, nbytes: int) -> int:
        self._adopt_meta(conn)
        if nbytes > self.config.budget_bytes:
            raise ValueError(f"this entry is {nbytes} bytes, more than the store's whole budget of "
                             f"{self.config.budget_bytes} bytes; raise the budget (budget_bytes / --budget-mb)")
        return self.config.budget_bytes

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
    def _bump(conn, **deltas: float) -> None:
        """Add to counters in one statement (rows locked in name order: no deadlock between clients)."""
        names = sorted(k for k, v in deltas.items() if v)
        if names:
            conn.execute("UPDATE chai_counters AS c SET value = c.value + d.delta FROM "
                         "unnest(%s::text[], %s::float8[]) AS d(name, delta) WHERE c.name = d.name",
                         (names, [float(deltas[n]) for n in names]))

    def _evict_locked(self, conn, incoming: int, exclude: int | None, budget: int | None = None) -> list:
        """Delete entries in policy order until ``held + incoming <= budget`` (caller holds the
        writer lock). Returns the deleted entries' bucket keys (None for bytea), to remove after COMMIT."""
        budget = self.config.budget_bytes if budget is None else budget
        held = int(conn.execute("SELECT value FROM chai_counters WHERE name='bytes_held'").fetchone()[0])
        excess = held + incoming - budget
        if excess <= 0:
            return []
        victims: list[tuple[int, int, str | None]] = []
        freed, offset, batch = 0, 0, 8
        order = self.config.policy.order_by
        while freed < excess:
            rows = conn.execute(f"SELECT id, nbytes, blob_key FROM chai_entries WHERE id <> %s "
                                f"ORDER BY {order} LIMIT %s OFFSET %s", (exclude or 0, batch, offset)).fetchall()
            if not rows:
                break
            for entry_id, nbytes, key in rows:
                victims.append((int(entry_id), int(nbytes), key))
                freed += int(nbytes)
                if freed >= excess:
                    break
            offset += len(rows)
            batch *= 4
        conn.execute("DELETE FROM chai_entries WHERE id = ANY(%s)", ([v[0] for v in victims],))
        self._bump(conn, bytes_held=-freed, evictions=len(victims), generation=1)
        return [v[2] for v in victims]

    def _delete_blobs(self, keys: Iterable[str]) -> None:
        keys = [k for k in keys if k]
        if keys and self.blobs is not None:
            try:
                self.blobs.delete(keys)
            except Exception as exc:  # the rows are gone; verify collects what is left
                log.warning("CHAI store %s: could not delete %d blob(s) (%s); 'cache verify' removes them later",
                            self.location, len(keys), exc)

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
        _validate_budget(budget_bytes)

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
            rows = conn.execute("DELETE FROM chai_entries WHERE id = ANY(%s) RETURNING nbytes, blob_key",
                                (ids,)).fetchall()
            if rows:
                self._bump(conn, bytes_held=-sum(int(r[0]) for r in rows), generation=1)
            return len(rows), [r[1] for r in rows if r[1]]

        count, keys = self._run(remove)
        self._delete_blobs(keys)
        return count

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
            "SELECT q.i - 1, e.label, e.entry_id, e.text, 1 - (e.embedding <=> q.v) FROM "
            "unnest(%b::vector[]) WITH ORDINALITY AS q(v, i) CROSS JOIN LATERAL ("
            "SELECT label, entry_id, text, embedding FROM chai_entities WHERE compat_key = %s "
            "ORDER BY embedding <=> q.v LIMIT %s) e",
            (list(vectors), compat_key, int(k))).fetchall(), transaction=False)
        matches = [EntityMatch(int(label), int(entry_id), text, float(sim), int(qi))
                   for qi, label, entry_id, text, sim in rows]
        matches.sort(key=lambda m: -m.similarity)
        return matches

    def _reload_dim(self) -> None:
        row = self._run(lambda c: c.execute("SELECT value FROM chai_meta WHERE key='dim'").fetchone(), transaction=False)
        if row is not None:
            self.dim = int(row[0])

    def load(self, entry_id: int, device: str = "cpu") -> dict | None:
        """An entry's latents after checking size and SHA-256 against its row; a bad blob is
        quarantined (row moved to ``chai_quarantine``, reported) and ``None`` returned (a miss).

        Returns:
            name -> torch tensor (dtype as stored), or None when the entry is gone or invalid.
        """
        from safetensors.torch import load as load_bytes

        # Binary results: bytea comes as raw bytes, not hex text twice its size.
        row = self._run(lambda c: c.execute("SELECT nbytes, sha256, blob, blob_key FROM chai_entries WHERE id=%s",
                                            (int(entry_id),), binary=True).fetchone(), transaction=False)
        if row is None:
            return None
        nbytes, digest, blob, blob_key = row
        problem, blob = self._check_blob(int(nbytes), digest, blob, blob_key)
        if problem is None:
            try:
                tensors = load_bytes(blob)
            except Exception as exc:
                problem = f"latents are not valid safetensors ({exc})"
        if problem is not None:
            self._quarantine(int(entry_id), problem)
            return None
        if device != "cpu":
            tensors = {k: v.to(device) for k, v in tensors.items()}
        return tensors

    def _check_blob(self, nbytes: int, digest: str, blob, blob_key: str | None) -> tuple[str | None, bytes | None]:
        """(problem or None, the bytes)."""
        if blob_key:
            if self.blobs is None:
                return f"latents are in a bucket ({blob_key}) but this store has no blob store", None
            try:
                blob = self.blobs.get(blob_key)
            except KeyError:
                return f"latent object {blob_key} is missing", None
        if blob is None:
            return "latents are missing", None
        blob = bytes(blob)
        if len(blob) != nbytes:
            return f"latents are {len(blob)} bytes, the row recorded {nbytes}", blob
        if hashlib.sha256(blob).hexdigest() != digest:
            return "latents do not match their recorded SHA-256", blob
        return None, blob

    def _quarantine(self, entry_id: int, reason: str) -> None:
        def move(conn):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITER_LOCK,))
            row = conn.execute("DELETE FROM chai_entries WHERE id=%s RETURNING nbytes, blob, blob_key",
                               (entry_id,)).fetchone()
            if row is None:
                return False
            conn.execute("INSERT INTO chai_quarantine VALUES(%s, %s, %s, %s, %s)",
                         (entry_id, time.time(), reason, row[1], row[2]))
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

    def _records(self, where: str, params: tuple) -> list[EntryRecord]:
        has_entities = self.dim is not None
        texts = ("(SELECT coalesce(array_agg(text ORDER BY label), '{}') FROM chai_entities WHERE entry_id = e.id)"
                 if has_entities else "'{}'::text[]")
        rows = self._run(lambda c: c.execute(
            f"SELECT e.id, e.compat_key, e.prompt, e.nbytes, e.created_at, e.last_access, e.access_count, e.info, "
            f"{texts} FROM chai_entries e {where} ORDER BY e.id", params).fetchall(), transaction=False)
        return [EntryRecord(int(r[0]), r[1], r[2], list(r[8]), int(r[3]), float(r[4]), float(r[5]), int(r[6]),
                            json.loads(r[7])) for r in rows]

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
                conn.execute("INSERT INTO chai_lookup_log(time, prompt, hit, entity, matched, similarity, ms) "
                             "VALUES(%s,%s,%s,%s,%s,%s,%s)",
                             (now, prompt[:500], hit, entity, matched, similarity, float(ms)))
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
            meta = dict(conn.execute("SELECT key, value FROM chai_meta").fetchall())
            counters = {k: float(v) for k, v in conn.execute("SELECT name, value FROM chai_counters").fetchall()}
            entries, held = conn.execute("SELECT count(*), coalesce(sum(nbytes), 0) FROM chai_entries").fetchone()
            n_entities = conn.execute("SELECT count(*) FROM chai_entities").fetchone()[0] if has_entities else 0
            ms = [r[0] for r in conn.execute("SELECT ms FROM chai_lookup_log ORDER BY id DESC LIMIT %s",
                                             (LOOKUP_LOG_KEEP,))]
            top = [(t, int(n)) for t, n in conn.execute(
                "SELECT text, count FROM chai_entity_counts ORDER BY count DESC, text ASC LIMIT 10")]
            recent = [dict(zip(("time", "prompt", "hit", "entity", "matched", "similarity", "ms"), r))
                      for r in conn.execute("SELECT time, prompt, hit, entity, matched, similarity, ms FROM "
                                            "chai_lookup_log ORDER BY id DESC LIMIT %s", (int(last),))]
            return meta, counters, int(entries), int(held), int(n_entities), ms, top, recent

        meta, counters, entries, held, n_entities, ms, top, recent = self._run(snapshot)
        lookups = int(counters.get("lookups", 0))
        stats = StoreStats(
            entries=entries, entities=n_entities, bytes=held, budget_bytes=int(meta["budget_bytes"]),
            hits=int(counters.get("hits", 0)), misses=int(counters.get("misses", 0)), lookups=lookups,
            evictions=int(counters.get("evictions", 0)), inserts=int(counters.get("inserts", 0)),
            repairs=int(counters.get("repairs", 0)), quarantined=int(counters.get("quarantined", 0)),
            hit_rate=(counters.get("hits", 0) / lookups) if lookups else 0.0,
            lookup_ms_mean=float(np.mean(ms)) if ms else 0.0,
            lookup_ms_p50=float(np.percentile(ms, 50)) if ms else 0.0,
            lookup_ms_p99=float(np.percentile(ms, 99)) if ms else 0.0,
            top_entities=top, last_lookups=recent, generation=int(counters.get("generation", 0)),
            policy=EvictionPolicy.parse(meta["policy"]).value)
        self.config = _replace(self.config, budget_bytes=stats.budget_bytes, policy=EvictionPolicy.parse(stats.policy))
        return stats

    def events(self, limit: int = 50) -> list[dict]:
        """The newest repair / quarantine events: dicts with time, kind, detail."""
        rows = self._run(lambda c: c.execute("SELECT time, kind, detail FROM chai_events ORDER BY id DESC LIMIT %s",
                                             (int(limit),)).fetchall(), transaction=False)
        return [dict(zip(("time", "kind", "detail"), r)) for r in rows]

    # ------------------------------------------------------------------ maintenance
    def verify(self, full: bool = True, orphan_grace_s: float = 3600.0) -> VerifyReport:
        """Check every entry's latents (size, and SHA-256 plus safetensors header when ``full``),
        the byte counter, the HNSW index and, with a bucket, objects without a row; repair what is
        wrong (quarantine, recount, rebuild, delete orphans older than ``orphan_grace_s``, which
        an insert still in flight may own).

        Returns:
            A :class:`VerifyReport`; ``report.ok`` is True when nothing needed repair.
        """
        from safetensors.torch import load as load_bytes

        report = VerifyReport()
        last = 0
        while True:
            cols = "nbytes, sha256, blob, blob_key" if full else "nbytes, sha256, octet_length(blob), blob_key"
            rows = self._run(lambda c: c.execute(
                f"SELECT id, {cols} FROM chai_entries WHERE id > %s ORDER BY id LIMIT 64", (last,)).fetchall(),
                transaction=False)
            if not rows:
                break
            for entry_id, nbytes, digest, blob, blob_key in rows:
                last = int(entry_id)
                report.entries_checked += 1
                if full:
                    problem, data = self._check_blob(int(nbytes), digest, blob, blob_key)
                    if problem is None:
                        try:
                            load_bytes(data)
                        except Exception as exc:
                            problem = f"latents are not valid safetensors ({exc})"
                else:
                    problem = self._check_size(int(nbytes), blob, blob_key)
                if problem:
                    report.problems.append(f"entry {entry_id}: {problem}")
                    report.files_quarantined.append(str(entry_id))
                    self._quarantine(int(entry_id), problem)

        def recount(conn):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITER_LOCK,))
            held = int(conn.execute("SELECT coalesce(sum(nbytes), 0) FROM chai_entries").fetchone()[0])
            counted = int(conn.execute("SELECT value FROM chai_counters WHERE name='bytes_held'").fetchone()[0])
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
            known = set(r[0] for r in self._run(lambda c: c.execute(
                "SELECT blob_key FROM chai_entries WHERE blob_key IS NOT NULL UNION "
                "SELECT blob_key FROM chai_quarantine WHERE blob_key IS NOT NULL").fetchall(), transaction=False))
            cutoff = time.time() - orphan_grace_s
            orphans = [key for key, modified in self.blobs.list() if key not in known and modified < cutoff]
            if orphans:
                self.blobs.delete(orphans)
                report.orphans_removed.extend(orphans)
                report.problems.append(f"{len(orphans)} latent object(s) without an entry (interrupted inserts)")
        return report

    def _check_size(self, nbytes: int, size, blob_key: str | None) -> str | None:
        if blob_key:
            if self.blobs is None:
                return f"latents are in a bucket ({blob_key}) but this store has no blob store"
            size = self.blobs.size(blob_key)
            if size is None:
                return f"latent object {blob_key} is missing"
        if size is None:
            return "latents are missing"
        if int(size) != nbytes:
            return f"latents are {size} bytes, the row recorded {nbytes}"
        return None

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
    from dataclasses import fields

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
