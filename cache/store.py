"""The persistent, crash-safe, multi-process CHAI latent store.

Layout of a store directory (every path derived by the store itself, see :mod:`.store_files`)::

    chai-store.json            marker: format name and version, store id (written at creation)
    manifest.sqlite            the truth: entries, entities (+ embeddings), counters, logs (WAL mode)
    latents/<id>.safetensors   one file per entry: the cached latents of one request
    index/index-<key>.bin      hnswlib partitions (derived data; rebuilt from the manifest when needed)
    quarantine/                corrupt latent files moved aside, never served
    store.lock                 cross-process writer lock (filelock)

Guarantees (DESIGN.md, "The store"; issue 14; docs/store_security.md):

* A store knows itself: a folder is opened only when it is empty, missing, or a CHAI store (its
  marker, or a manifest of the previous format, recognised read-only and upgraded in place).
  Any other folder is refused before anything in it is read, written or deleted.
* Write order: latent file (temp, fsync) -> manifest rows and the rename to ``<id>.safetensors``
  in one transaction -> index. A crash at any point leaves either no entry or a whole one; stray
  files of the store's own naming are removed when the store is next opened.
* The manifest is the truth. Every index candidate is checked against a manifest row, and every
  latent file against its recorded size (``fstat``, before reading), SHA-256 and tensor spec
  (safetensors header) before it is served. A bad file is quarantined and reported.
* Untrusted stores cannot reach outside themselves or crash the process: no link is followed, no
  index file reaches hnswlib unless signed by this user's key or structurally checked, and SQLite
  runs with ``trusted_schema`` off.
* One writer at a time across processes (a file lock); readers never block (SQLite WAL).
* A byte budget: the manifest's byte total never exceeds it; lowering it below what is held needs
  ``evict_to_fit``; an entry larger than the budget is refused (:class:`EntryTooLargeError`).
* Pinned entries (format 3) are never evicted; their bytes count against the budget, and a
  budget below them is refused (:class:`PinnedError`). Each entry may keep a thumbnail (a JPEG
  or PNG of at most ``MAX_THUMBNAIL_BYTES``) in its manifest row: no file, so no path; its size
  and signature are checked before it is served.
* Only safetensors and SQLite are read from disk.

This module composes the parts: :mod:`.store_manifest` (SQLite), :mod:`.store_files` (files and
containment), :mod:`.store_index` (index sync), :mod:`.store_budget` (budget and eviction).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import sqlite3
import stat
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .index import partition_file_name
from .index_file import IndexKey
from .policy import EvictionPolicy
from .store_budget import change_budget, check_entry_fits, evict, validate_budget, victims_for_entry
from .store_files import (
    FORMAT_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    MARKER_NAME,
    BlobError,
    StoreFiles,
    check_safetensors,
    decode_latents,
    encode_entry,
    spec_mismatch,
)
from .store_index import IndexSync
from .store_manifest import (
    LOOKUP_LOG_KEEP,
    MANIFEST_SIDE_FILES,
    MAX_THUMBNAIL_BYTES,
    SCHEMA_VERSION,
    Manifest,
    ManifestInfo,
    check_thumbnail,
    connect_read_only,
    parse_tensor_spec,
    probe_manifest,
    read_stats_from,
    schema_version,
    sqlite_store_error,
)
from .store_types import (
    ALLOWED_DTYPES,
    DEFAULT_BUDGET_BYTES,
    MAX_BUDGET_BYTES,
    MAX_ENTRY_BYTES,
    BudgetError,
    ContainmentError,
    PinnedError,
    DiskFullError,
    EntityMatch,
    EntryRecord,
    EntryTooLargeError,
    StoreConfig,
    StoreError,
    StoreStats,
    VerifyReport,
)

__all__ = [
    "StoreError",
    "ContainmentError",
    "DiskFullError",
    "BudgetError",
    "PinnedError",
    "EntryTooLargeError",
    "StoreConfig",
    "LatentStore",
    "EntryRecord",
    "EntityMatch",
    "StoreStats",
    "VerifyReport",
    "read_stats",
    "identify_folder",
    "ALLOWED_DTYPES",
    "DEFAULT_BUDGET_BYTES",
    "MAX_BUDGET_BYTES",
    "MAX_ENTRY_BYTES",
    "MAX_THUMBNAIL_BYTES",
    "SCHEMA_VERSION",
    "LOOKUP_LOG_KEEP",
]

log = logging.getLogger("comfyui_chai.store")

FORMAT_VERSION = SCHEMA_VERSION
_MARKER_TMP = re.compile(r"^\.chai-store\.json\.tmp-[0-9a-f]{32}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


def identify_folder(path: Path) -> tuple[str, dict | ManifestInfo | None]:
    """What a folder is, found without writing anything in it.

    Returns:
        ("missing", None), ("empty", None), ("marked", marker dict) for a store with its marker,
        or ("unmarked", ManifestInfo) for a store whose manifest is recognised but that has no
        marker yet (written by the previous release, or an upgrade was interrupted).

    Raises:
        StoreError: a file, not a folder. ContainmentError: a folder that is not a CHAI store
            (someone's files, another application's ``manifest.sqlite``), a marker or manifest that
            is a link, or a marker of another format.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing", None
    except OSError as exc:
        raise StoreError(f"cannot reach the store folder {path} ({exc.strerror or exc})") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"store path {path} is not a CHAI store but a file; give a folder (it is created if "
                         "missing)")
    try:
        names = os.listdir(path)
    except OSError as exc:
        raise StoreError(f"cannot list the store folder {path} ({exc.strerror or exc}); give a folder you can read") \
            from exc
    if all(_MARKER_TMP.match(n) for n in names):  # nothing, or only an interrupted creation's temp marker
        return "empty", None
    files = StoreFiles(path)
    if MARKER_NAME in names:
        marker = files.read_marker()
        _check_marker(marker, path)
        return "marked", marker
    if MANIFEST_NAME in names:
        files.check_top_level(MANIFEST_SIDE_FILES)
        manifest = path / MANIFEST_NAME
        info = probe_manifest(manifest)  # immutable: reads the file alone, creates no side file
        if info is not None:
            return "unmarked", info
        raise ContainmentError(
            f"{manifest} is not a CHAI manifest (another application's database?); CHAI never alters it and "
            f"opened nothing in {path}: give a new or empty folder for the store")
    raise ContainmentError(
        f"{path} is not empty and is not a CHAI store (no {MARKER_NAME}); CHAI opens only empty folders or its own "
        "stores, so nothing in it was read, written or deleted: give a new folder name for the store")


def _check_marker(marker: dict, path: Path) -> None:
    if marker.get("format") != FORMAT_NAME:
        raise ContainmentError(f"{path / MARKER_NAME} is not a CHAI store marker (format {marker.get('format')!r}); "
                               "this folder was not made by CHAI: give a new folder")
    version = marker.get("version")
    if type(version) is not int or version < 2:
        raise ContainmentError(f"{path / MARKER_NAME} names format version {version!r}, which no CHAI release writes")
    if version > FORMAT_VERSION:
        raise StoreError(f"the store {path} was written by a newer CHAI release (store format {version}, this one "
                         f"reads up to {FORMAT_VERSION}); update comfyui-chai or use another folder")
    if not isinstance(marker.get("store_id"), str) or not _HEX32.match(marker["store_id"]):
        raise ContainmentError(f"{path / MARKER_NAME} has no valid store id; it was not written by CHAI")


def _new_marker(store_id: str) -> dict:
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "store_id": store_id, "created_at": time.time()}


class LatentStore:
    """A directory of cached latents, shared safely by several processes.

    Open with :meth:`open` (or the constructor), use as a context manager or call :meth:`close`.

    Args:
        path: the store directory: missing (created; its parent must exist), empty, or a CHAI store.
        config: :class:`StoreConfig`; ``budget_bytes`` and ``policy`` given here replace the
            persisted ones, ``None`` keeps them.
        dim: embedding dimension. Required for a new store unless the first insert sets it;
            checked against the persisted one for an existing store.
        budget_bytes / policy: shortcuts for the same fields of ``config``.
        evict_to_fit: allow a ``budget_bytes`` smaller than what the store holds; the entries
            beyond it are evicted (policy order). Without it such a budget raises BudgetError.
        create: make a new store when the folder is missing or empty (False: only open one).

    Raises:
        StoreError: the path is a file, not writable, a store of a newer format, or its dimension
            differs from ``dim``; DiskFullError when its disk is full.
        ContainmentError: the folder is not empty and not a CHAI store, or a part of it is a link.
        BudgetError: ``budget_bytes`` would evict entries and ``evict_to_fit`` is False.
        ValueError: a non-positive budget or an unknown policy.

    Attributes:
        path: the resolved store folder. store_id: its id (32 hex, from its marker).
        config: the :class:`StoreConfig` in force (budget and policy follow the manifest).
        open_report: repairs made since the store was opened ("kind: detail"), e.g. an index
            rebuilt or a file quarantined. notes: what the open did that is not a repair (an upgrade).
        left_alone: ``sub/name`` of files in ``latents/`` or ``index/`` the store did not make
            (never touched).
    """

    def __init__(self, path: str | os.PathLike, config: StoreConfig | None = None, dim: int | None = None,
                 budget_bytes: int | None = None, policy: str | EvictionPolicy | None = None, *,
                 evict_to_fit: bool = False, create: bool = True) -> None:
        self.path = Path(path).expanduser().resolve()
        base = config or StoreConfig()
        if budget_bytes is not None:
            base = replace(base, budget_bytes=budget_bytes)
        if policy is not None:
            base = replace(base, policy=EvictionPolicy.parse(policy))
        validate_budget(base.budget_bytes)
        self.config = replace(base, policy=EvictionPolicy.parse(base.policy))
        self._explicit_budget = budget_bytes is not None or config is not None
        self._explicit_policy = policy is not None or config is not None
        self._closed = False
        self.open_report: list[str] = []
        self.notes: list[str] = []
        self.left_alone: list[str] = []
        self._files = StoreFiles(self.path)
        self._manifest = Manifest(self.path, self.config.durable)
        self._specs: dict[str, dict] = {}
        self._stats_warned = False
        try:
            self._open(dim, evict_to_fit, create)
        except BaseException:
            self._closed = True
            self._manifest.close()
            raise

    @classmethod
    def open(cls, path: str | os.PathLike, **kwargs) -> "LatentStore":
        """Open (or create) a store; same arguments as the constructor."""
        return cls(path, **kwargs)

    # ------------------------------------------------------------------ open
    def _open(self, dim: int | None, evict_to_fit: bool, create: bool) -> None:
        kind, found = identify_folder(self.path)
        if kind in ("missing", "empty"):
            if not create:
                raise ContainmentError(f"{self.path} is not a CHAI store (no {MARKER_NAME}); check the path, or create "
                                       "the store by running a request with it")
            store_id = self._create_folder(kind == "missing")
        elif kind == "marked":
            store_id = found["store_id"]
        else:
            store_id = found.store_id  # None for format 1: set by the upgrade
        import filelock

        try:
            self._files.check_top_level(MANIFEST_SIDE_FILES + (MARKER_NAME, LOCK_NAME))
            self._files.make_folders()
            self._check_writable()
            self._lock = filelock.FileLock(str(self._files.ensure_lock_file()), timeout=120)
            with self._lock:
                if kind == "unmarked":
                    store_id = self._finish_unmarked(store_id)
                elif kind == "marked" and found.get("version") != FORMAT_VERSION:
                    self._upgrade_marked(store_id)
                meta = self._open_manifest(store_id, dim)
                self.store_id = meta["store_id"]
                self._sync = IndexSync(self._manifest, self._files, self.store_id, meta["index_params"],
                                       self.config.durable, IndexKey.for_user(), self._event)
                self._sync.set_dim(meta["dim"])
                self._repair_rows()
                self._sync.load_all()
                self._remove_invalid(self._sync.take_bad_entries())
                self._collect_garbage(legacy=meta["upgraded_from"] is not None)
                self._apply_config(evict_to_fit)
        except sqlite3.Error as exc:
            raise sqlite_store_error(exc, self.path, "open the manifest") from exc
        except OSError as exc:
            raise self._os_error(exc, "open the store") from exc
        except filelock.Timeout as exc:
            raise StoreError(f"the store {self.path} stayed locked by another process for two minutes; close the other "
                             "CHAI process (ComfyUI, the command line) and run again") from exc

    def _create_folder(self, missing: bool) -> str:
        """Make a new store: the folder (its parent must exist) and its marker. Returns the store id."""
        if missing and not self.path.parent.is_dir():
            raise StoreError(f"cannot create the store {self.path}: its parent folder {self.path.parent} does not exist; "
                             "create it first or give another path")
        store_id = uuid.uuid4().hex
        try:
            if missing:
                try:
                    os.mkdir(self.path)
                except FileExistsError:  # made by another process meanwhile: identify it again
                    kind, found = identify_folder(self.path)
                    if kind == "marked":
                        return found["store_id"]
                    if kind != "empty":
                        raise ContainmentError(f"{self.path} appeared while the store was being created; "
                                               "open it again") from None
            self._files.write_marker(_new_marker(store_id))
        except OSError as exc:
            raise StoreError(f"store folder {self.path} is not writable ({exc.strerror or exc}); give a folder you "
                             "can write to, or copy the store somewhere writable") from exc
        for name in os.listdir(self.path):
            if _MARKER_TMP.match(name):
                try:
                    os.unlink(self.path / name)
                except OSError:
                    pass
        return store_id

    def _check_writable(self) -> None:
        probe = self.path / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise self._os_error(exc, "write in the store folder") from exc
            raise StoreError(
                f"store folder {self.path} is not writable ({exc.strerror or exc}); give a folder you can write to, "
                "or copy the store somewhere writable (`cache stats --read-only` reads it where it is)") from exc

    def _finish_unmarked(self, store_id: str | None) -> str:
        """Upgrade a format-1 store in place (or finish an interrupted upgrade); write its marker."""
        version = schema_version(self._manifest.conn())  # again, under the lock: another process may have done it
        if version == 1:
            store_id = uuid.uuid4().hex
            kept, dropped = 0, []
            for entry_id, file in self._manifest.conn().execute("SELECT id, file FROM entries").fetchall():
                ok = isinstance(entry_id, int) and entry_id > 0 and isinstance(file, str)
                if ok and self._files.rename_legacy_latent(file, entry_id):
                    kept += 1
                else:
                    dropped.append((entry_id, f"its file {str(file)[:80]!r} is not a latent file CHAI wrote, or it is "
                                              "missing (never touched)"))
            self._manifest.upgrade_from_v1(store_id, kept, dropped)  # straight to the current format
            self.notes.append(f"upgraded the store from format 1 to {SCHEMA_VERSION}: {kept} entries kept, "
                              f"{len(dropped)} dropped")
            log.warning("CHAI store %s: upgraded from format 1 (%d entries kept, %d dropped)", self.path, kept,
                        len(dropped))
        elif version in (2, SCHEMA_VERSION):  # format 2 never lacked its marker, but an interrupted upgrade may
            store_id = store_id or self._manifest.conn().execute(
                "SELECT value FROM meta WHERE key='store_id'").fetchone()[0]
            if version == 2:
                self._manifest.upgrade_from_v2()
                self.notes.append(f"upgraded the store from format 2 to {SCHEMA_VERSION}: every entry kept")
        else:
            raise ContainmentError(f"{self.path / MANIFEST_NAME} is no longer a CHAI manifest; open a new store folder")
        self._files.write_marker(_new_marker(store_id))
        return store_id

    def _upgrade_marked(self, store_id: str) -> None:
        """Upgrade a marked format-2 store to the current format in place (caller holds the lock):
        the manifest first (one transaction, every entry kept), the marker last, so an interrupted
        upgrade finishes on the next open. A marker of the current format over a format-2 manifest
        cannot happen (the marker is written after the manifest's commit)."""
        manifest = self.path / MANIFEST_NAME
        if manifest.exists() and not self._manifest.is_empty():
            version = schema_version(self._manifest.conn())
            if version == 2:
                self._manifest.upgrade_from_v2()
                self.notes.append(f"upgraded the store from format 2 to {SCHEMA_VERSION}: every entry kept "
                                  "(entries can now be pinned and keep a thumbnail)")
                log.warning("CHAI store %s: upgraded from format 2 to %d", self.path, SCHEMA_VERSION)
            elif version != SCHEMA_VERSION:
                raise ContainmentError(f"{manifest} is not a CHAI manifest of the format its marker names; "
                                       "it was altered outside CHAI: open a new store folder")
        self._files.write_marker(_new_marker(store_id))

    def _open_manifest(self, store_id: str, dim: int | None) -> dict:
        if not (self.path / MANIFEST_NAME).exists() or self._manifest.is_empty():
            params = {"M": self.config.index_M, "ef_construction": self.config.index_ef_construction,
                      "ef_search": self.config.index_ef_search,
                      "compact_tombstone_share": self.config.compact_tombstone_share}
            self._manifest.create(store_id, self.config.budget_bytes, self.config.policy, dim, params)
        meta = self._manifest.validate(store_id)
        if Manifest.counted_bytes_drifted(self._manifest.conn()):  # the trigger-kept counter starts each open exact
            with self._manifest.tx() as c:
                Manifest.recount_bytes(c)
        stored_dim = meta["dim"]
        if dim is not None and stored_dim is not None and int(dim) != stored_dim:
            raise StoreError(f"store {self.path} holds {stored_dim}-d embeddings but the embedder gives {dim}-d; "
                             "use the embedder the store was built with, or a new store folder")
        if dim is not None and stored_dim is None:
            with self._manifest.tx() as c:
                c.execute("INSERT OR REPLACE INTO meta VALUES('dim', ?)", (str(int(dim)),))
            meta["dim"] = int(dim)
        return meta

    def _repair_rows(self) -> None:
        """Remove entries whose manifest rows CHAI could not have written (a store from elsewhere),
        then partitions whose key or tensor spec is not one CHAI writes (their entries went with
        them). Entity rows without their entry are harmless (search joins entries): left to verify."""
        self._remove_invalid(self._manifest.invalid_entries())
        self._clear_invalid_thumbnails()
        dropped = self._manifest.drop_invalid_partitions()
        if dropped:
            with self._manifest.tx() as c:
                self._event(c, "rows_removed", f"{dropped} partition row(s) with a key or tensor spec CHAI never "
                                               "writes")

    def _clear_invalid_thumbnails(self) -> int:
        """Drop thumbnails and pinned flags CHAI never writes (the entries stay); one repair event."""
        fixed = self._manifest.clear_invalid_thumbnails()
        if fixed:
            with self._manifest.tx() as c:
                c.execute("UPDATE counters SET value=value+? WHERE name='repairs'", (fixed,))
                self._event(c, "rows_repaired", f"{fixed} entry row(s) with a thumbnail or pinned flag CHAI never "
                                                "writes (thumbnail dropped, entry unpinned; the entries are kept)")
        return fixed

    def _remove_invalid(self, bad: list[tuple[int, str]]) -> int:
        """Delete entries that cannot be trusted ((id, reason) pairs) with one repair event each
        (the first 20); their files, where regular, go to quarantine/. Caller holds the writer lock.
        Returns how many were removed."""
        if not bad:
            return 0
        with self._manifest.tx() as c:
            present = [b for b in bad if c.execute("SELECT 1 FROM entries WHERE id=?", (b[0],)).fetchone()]
            if not present:
                return 0
            Manifest.delete_entries(c, [b[0] for b in present], Manifest.bump_generation(c))
            Manifest.recount_bytes(c)  # the delete trigger subtracted whatever size the bad row claimed
            c.execute("UPDATE counters SET value=value+? WHERE name='repairs'", (len(present),))
            for entry_id, reason in present[:20]:
                self._event(c, "rows_removed", f"entry {entry_id}: {reason}")
            if len(present) > 20:
                self._event(c, "rows_removed", f"{len(present) - 20} more entries with invalid rows")
        for entry_id, _ in present:
            if 0 < entry_id < 1 << 63:
                self._files.quarantine_latent(entry_id)
        if self._sync.index is not None:
            self.sync()
        return len(present)

    def _apply_config(self, evict_to_fit: bool) -> None:
        """Persist an explicitly given policy and budget (a smaller budget only with ``evict_to_fit``);
        adopt the persisted ones otherwise. Writes only what changes."""
        policy, budget = self._policy_and_budget_persisted()
        wanted_policy = self.config.policy if self._explicit_policy else policy
        wanted_budget = self.config.budget_bytes if self._explicit_budget else budget
        self.config = replace(self.config, policy=wanted_policy, budget_bytes=wanted_budget)
        if (wanted_policy, wanted_budget) == (policy, budget):
            return
        with self._manifest.tx() as c:
            c.execute("UPDATE meta SET value=? WHERE key='policy'", (wanted_policy.value,))
            victims = change_budget(c, wanted_budget, wanted_policy, evict_to_fit, str(self.path))
        self._after_delete(victims)

    def _collect_garbage(self, legacy: bool) -> None:
        """Remove the store's own files that no row names (an interrupted write); report the rest."""
        conn = self._manifest.conn()
        live = {int(r[0]) for r in conn.execute("SELECT id FROM entries")}
        parts = {partition_file_name(r[0]) for r in conn.execute("SELECT compat_key FROM partitions WHERE typeof(compat_key)='text'")}
        result = self._files.collect_garbage(live, parts, legacy)
        if result.removed:
            with self._manifest.tx() as c:
                self._event(c, "orphans_removed", f"{len(result.removed)} stray file(s) from an interrupted write: "
                            + ", ".join(result.removed[:5]))
        self.left_alone = result.left_alone
        if result.left_alone:
            log.warning("CHAI store %s: left alone (not the store's own files): %s", self.path,
                        ", ".join(result.left_alone[:5]))

    # ------------------------------------------------------------------ helpers
    def _conn(self) -> sqlite3.Connection:
        return self._manifest.conn()

    def _tx(self):
        return self._manifest.tx()

    @property
    def index(self):
        """The in-memory :class:`~comfyui_chai.cache.index.EntityIndex` (None before the first entry)."""
        return self._sync.index

    @property
    def dim(self) -> int | None:
        """Embedding dimension of the store (None before the first entry)."""
        return self._sync.dim

    def _event(self, c, kind: str, detail: str) -> None:
        c.execute("INSERT INTO events(time, kind, detail) VALUES(?,?,?)", (time.time(), kind, detail))
        self.open_report.append(f"{kind}: {detail}")
        log.warning("CHAI store %s: %s: %s", self.path, kind, detail)

    def _os_error(self, exc: OSError, doing: str) -> StoreError:
        if isinstance(exc, StoreError):
            return exc
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            try:
                import shutil

                free = int(shutil.disk_usage(self.path).free)
            except OSError:
                free = -1
            return DiskFullError(f"could not {doing}: the disk holding {self.path} is full ({free:,} bytes free); free "
                                 "some space (or lower the store's budget) and run again: nothing already stored "
                                 "was lost", str(self.path), free)
        return StoreError(f"could not {doing} in {self.path} ({exc.strerror or exc}); the store folder must be "
                          "writable and have free space: free some space, or use another folder")

    def _policy_and_budget_persisted(self, c=None) -> tuple[EvictionPolicy, int]:
        """The policy and budget the manifest holds."""
        rows = dict((c or self._conn()).execute(
            "SELECT key, value FROM meta WHERE key IN ('budget_bytes', 'policy')").fetchall())
        return EvictionPolicy.parse(rows["policy"]), int(rows["budget_bytes"])

    def _policy_and_budget(self, c=None) -> tuple[EvictionPolicy, int]:
        """The persisted policy and budget, adopted: another process may have changed them
        (``set_budget``, a node with another budget), and the manifest is the truth."""
        policy, budget = self._policy_and_budget_persisted(c)
        self._adopt_config(budget, policy)
        return self.config.policy, self.config.budget_bytes

    def _adopt_config(self, budget_bytes: int, policy: EvictionPolicy | str) -> None:
        policy = EvictionPolicy.parse(policy)
        if budget_bytes != self.config.budget_bytes or policy != self.config.policy:
            self.config = replace(self.config, budget_bytes=int(budget_bytes), policy=policy)

    def _spec(self, compat_key: str) -> dict:
        spec = self._specs.get(compat_key)
        if spec is None:
            row = self._conn().execute("SELECT tensor_spec FROM partitions WHERE compat_key=?", (compat_key,)).fetchone()
            try:
                spec = parse_tensor_spec(row[0] if row else None)
            except ValueError as exc:
                raise BlobError(f"its key's tensor spec is invalid ({exc})") from None
            self._specs[compat_key] = spec
        return spec

    def _after_delete(self, entry_ids: Sequence[int]) -> None:
        """After a commit that deleted entries: their files, the index, the save counter."""
        for entry_id in entry_ids:
            self._files.remove_latent(entry_id)
        if entry_ids:
            self.sync()
            self._sync.changes_since_save += len(entry_ids)

    # ------------------------------------------------------------------ index
    def sync(self) -> None:
        """Bring this process's in-memory index up to the manifest (other processes' inserts and
        evictions). Cheap when nothing changed: one SQLite read."""
        self._sync.sync()

    def save_index(self) -> None:
        """Write every partition of the index to disk (also done on close and every
        ``autosave_every`` changes)."""
        if self.index is None:
            return
        with self._lock:
            self.sync()
            self._sync.save_all()

    def compact(self) -> dict:
        """Rebuild every index partition without tombstones and save it; checkpoint the WAL.

        Returns:
            {"partitions": n, "tombstones_removed": n, "vectors": n}.
        """
        removed = vectors = 0
        with self._lock:
            self.sync()
            keys = self.index.keys() if self.index else []
            for key in keys:
                removed += self.index.tombstones(key)
                self._sync.compact_partition(key)
                vectors += len(self.index.labels(key))
            with self._tx() as c:
                c.execute("DELETE FROM deleted_labels WHERE generation<=?", (self._sync.synced_generation,))
                Manifest.note_pruned(c, self._sync.synced_generation)
            self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._sync.changes_since_save = 0
        return {"partitions": len(keys), "tombstones_removed": removed, "vectors": vectors}

    # ------------------------------------------------------------------ writes
    def put(
        self,
        tensors: Mapping[str, "object"],
        entities: Sequence[str],
        embeddings: np.ndarray,
        compat_key: str,
        prompt: str,
        info: Mapping | None = None,
        thumbnail: bytes | None = None,
    ) -> int:
        """Insert one entry: its latents, and the entities (with embeddings) it is found by.

        Args:
            tensors: name -> torch tensor (float16, bfloat16 or float32, finite, non-empty),
                e.g. ``{"step_2": [4,15,30,53], ...}``; every entry of one ``compat_key`` must
                have the same names, shapes and dtypes.
            entities: entity strings, one per embedding row (at least one).
            embeddings: [len(entities), dim] float32 (L2-normalised by the embedder).
            compat_key: compatibility key (model fingerprint, latent shape, config fingerprint...);
                lookups only match entries of the same key.
            prompt: the prompt that produced the latents (for reports).
            info: JSON-serialisable metadata kept with the entry.
            thumbnail: a JPEG or PNG of one frame of the entry's video, at most
                ``MAX_THUMBNAIL_BYTES`` (kept in the manifest row, written in the entry's transaction).

        Returns:
            The new entry id (its latents are ``latents/<id>.safetensors``).

        Raises:
            ValueError: wrong tensor type, dtype, shape or non-finite values; mismatched
                entities/embeddings, a thumbnail that is not a small JPEG/PNG. EntryTooLargeError (a
                ValueError): an entry larger than the whole budget, or than the room pinned
                entries leave in it; nothing is stored or evicted.
            StoreError: the store is closed, or its folder cannot be written (read-only);
                DiskFullError when its disk is full. Nothing committed is lost either way.
        """
        entry = encode_entry(tensors, entities, embeddings, compat_key, prompt, self.dim)
        info_json = json.dumps(dict(info or {}), sort_keys=True, default=str)
        thumb = None if thumbnail is None else check_thumbnail(thumbnail)
        check_entry_fits(entry.nbytes, self._policy_and_budget()[1])  # fail before writing; checked again below
        with self._lock:
            if self._closed:
                raise StoreError("the store is closed; open it again")
            try:
                if self.dim is None:
                    self._init_dim(entry.embeddings.shape[1])
                self.sync()
                self._remove_invalid(self._sync.take_bad_entries())  # found by a sync without the lock
                tmp = self._files.write_latent_temp(entry.blob, self.config.durable)
            except OSError as exc:  # read-only mount, disk full, permissions
                raise self._os_error(exc, f"write a latent file in {self.path / 'latents'}") from exc
            except sqlite3.Error as exc:
                raise sqlite_store_error(exc, self.path, "write the manifest") from exc
            published = None
            victims: list[int] = []
            try:
                with self._tx() as c:
                    row = c.execute("SELECT tensor_spec FROM partitions WHERE compat_key=?", (compat_key,)).fetchone()
                    if row is None:
                        c.execute("INSERT INTO partitions(compat_key, tensor_spec) VALUES(?,?)",
                                  (compat_key, json.dumps(entry.spec)))
                    elif _loads(row[0]) != entry.spec:
                        raise spec_mismatch(entry.spec, _loads(row[0]))
                    policy, budget = self._policy_and_budget(c)  # under the writer lock: final
                    check_entry_fits(entry.nbytes, budget)
                    chosen = victims_for_entry(c, policy, entry.nbytes, budget, str(self.path))
                    generation = Manifest.bump_generation(c)
                    evict(c, chosen, generation)
                    victims = [v[0] for v in chosen]
                    now = time.time()
                    cur = c.execute(
                        "INSERT INTO entries(compat_key, prompt, nbytes, sha256, created_at, last_access,"
                        " access_count, info, thumbnail) VALUES(?,?,?,?,?,?,0,?,?)",
                        (compat_key, prompt, entry.nbytes, entry.sha256, now, now, info_json, thumb),
                    )
                    entry_id = int(cur.lastrowid)
                    for text, vec in zip(entry.entities, entry.embeddings):
                        c.execute("INSERT INTO entities(entry_id, compat_key, text, embedding) VALUES(?,?,?,?)",
                                  (entry_id, compat_key, text, vec.astype(np.float32).tobytes()))
                    c.execute("UPDATE counters SET value=value+1 WHERE name='inserts'")
                    self._files.publish_latent(tmp, entry_id, self.config.durable)  # before COMMIT: a crash
                    published = entry_id  # here leaves a file no row names, removed on the next open
            except BaseException as exc:
                self._files.discard_temp(tmp)
                if published is not None:
                    self._files.remove_latent(published)
                if isinstance(exc, sqlite3.Error):
                    raise sqlite_store_error(exc, self.path, "write the manifest") from exc
                if isinstance(exc, OSError):
                    raise self._os_error(exc, f"write a latent file in {self.path / 'latents'}") from exc
                raise
            for victim in victims:
                self._files.remove_latent(victim)
            # Index last: the manifest already holds the truth if we die here.
            try:
                self.sync()
                self._sync.changes_since_save += 1 + len(victims)
                self._sync.maybe_compact_and_save(self.config.autosave_every)
            except (OSError, sqlite3.Error, StoreError) as exc:
                # The entry is committed and the index is derived data (the next open catches it
                # up from the manifest): report the failed save rather than fail a finished insert.
                self._report_index_save_failure(exc)
        return entry_id

    def _report_index_save_failure(self, exc: BaseException) -> None:
        log.warning("CHAI store %s: could not save the index (%s); it will be rebuilt from the manifest",
                    self.path, exc)
        try:
            with self._tx() as c:
                c.execute("INSERT INTO events(time, kind, detail) VALUES(?,?,?)",
                          (time.time(), "index_save_failed", f"{exc}; the next open rebuilds it from the manifest"))
        except sqlite3.Error:
            pass  # the manifest is not writable either: the warning above is all we can do

    def _init_dim(self, dim: int) -> None:
        with self._tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key='dim'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES('dim', ?)", (str(int(dim)),))
        self._sync.reload_dim()

    def set_budget(self, budget_bytes: int, evict_to_fit: bool = False) -> int:
        """Change the byte budget (persisted, for every process using the store).

        Args:
            budget_bytes: the new budget (bytes, 1..MAX_BUDGET_BYTES).
            evict_to_fit: when the store holds more than the new budget, evict the entries beyond
                it (policy order) in the same transaction; without it that is refused.

        Returns:
            The number of entries evicted.

        Raises:
            ValueError: budget out of range. BudgetError: it would evict and ``evict_to_fit`` is
                False (nothing is changed; the error says how many entries and bytes).
        """
        budget = validate_budget(budget_bytes)
        with self._lock:
            with self._tx() as c:
                policy, _ = self._policy_and_budget(c)
                victims = change_budget(c, budget, policy, evict_to_fit, str(self.path))
            self.config = replace(self.config, budget_bytes=budget)
            self._after_delete(victims)
        return len(victims)

    def delete(self, entry_ids: Sequence[int], reason: str = "deleted") -> int:
        """Remove entries (file, rows and vectors). Unknown ids are ignored.

        Returns:
            The number of entries removed.
        """
        with self._lock:
            with self._tx() as c:
                found = [int(r[0]) for r in (c.execute("SELECT id FROM entries WHERE id=?", (int(i),)).fetchone()
                                             for i in entry_ids) if r]
                if not found:
                    return 0
                Manifest.delete_entries(c, found, Manifest.bump_generation(c))
            self._after_delete(found)
            return len(found)

    def pin(self, entry_id: int, pinned: bool = True) -> bool:
        """Pin an entry (never evicted; its bytes still count against the budget) or unpin it.

        Returns:
            True when the entry exists (its flag is now ``pinned``), False for an unknown id.
        """
        with self._lock:
            with self._tx() as c:
                found = c.execute("UPDATE entries SET pinned=? WHERE id=?", (int(bool(pinned)), int(entry_id))).rowcount
                if found:  # an event row, but no repair report or warning: the user asked for it
                    c.execute("INSERT INTO events(time, kind, detail) VALUES(?,?,?)",
                              (time.time(), "pinned" if pinned else "unpinned", f"entry {int(entry_id)}"))
        return bool(found)

    def thumbnail(self, entry_id: int) -> bytes | None:
        """The entry's thumbnail (JPEG or PNG bytes, at most ``MAX_THUMBNAIL_BYTES``), or None when
        it has none or is gone. The size is checked in SQL before the blob is read, and the
        signature after, so a crafted row never yields more than the cap or bytes of another kind."""
        row = self._conn().execute(
            "SELECT thumbnail FROM entries WHERE id=? AND typeof(thumbnail)='blob' AND length(thumbnail) <= ?",
            (int(entry_id), MAX_THUMBNAIL_BYTES)).fetchone()
        if row is None:
            return None
        try:
            return check_thumbnail(row[0])
        except ValueError:
            return None

    # ------------------------------------------------------------------ reads
    def search(self, vectors: np.ndarray, compat_key: str, k: int = 8) -> list[EntityMatch]:
        """k-NN of each query vector among entities of ``compat_key``, confirmed by the manifest.

        Index candidates whose row no longer exists (evicted by another process, or a stale index)
        are dropped from the in-memory index (a repair) and not returned.

        Args:
            vectors: [m, dim] float32 query embeddings.
            compat_key: only entries stored under this key are candidates.
            k: neighbours per query vector.

        Returns:
            Matches sorted by similarity descending (several per query vector possible).
        """
        self.sync()
        if self.index is None:
            return []
        width = np.shape(vectors)[-1] if np.ndim(vectors) else 0
        if width != self.dim:
            raise ValueError(f"query vectors are {width}-d but the store {self.path} holds {self.dim}-d embeddings; "
                             "use the embedder the store was built with, or another store folder")
        labels, sims = self.index.query(vectors, k, compat_key)
        if labels.size == 0:
            return []
        flat = sorted(set(int(x) for x in labels.reshape(-1)))
        rows = {}
        conn = self._conn()
        for start in range(0, len(flat), 500):
            chunk = flat[start:start + 500]
            q = ("SELECT e.label, e.entry_id, e.text FROM entities e JOIN entries n ON n.id=e.entry_id "
                 f"WHERE e.compat_key=? AND n.compat_key=? AND e.label IN ({','.join('?' * len(chunk))})")
            for label, entry_id, text in conn.execute(q, (compat_key, compat_key, *chunk)):
                rows[int(label)] = (int(entry_id), str(text))
        stale = [label for label in flat if label not in rows]
        if stale:
            self.index.delete(stale, compat_key)
        matches = []
        for qi in range(labels.shape[0]):
            for label, sim in zip(labels[qi].tolist(), sims[qi].tolist()):
                if label in rows:
                    entry_id, text = rows[label]
                    matches.append(EntityMatch(label, entry_id, text, float(sim), qi))
        matches.sort(key=lambda m: -m.similarity)
        return matches

    def load(self, entry_id: int, device: str = "cpu") -> dict | None:
        """Read an entry's latents after checking its file: a regular file (no link followed) of
        the recorded size (``fstat`` before reading), its SHA-256, and a safetensors header that
        describes exactly the tensors of its key (dtype, shape, offsets) before any is built.

        A missing, truncated, corrupt or foreign file is quarantined (moved to ``quarantine/``),
        its rows removed and the event reported; ``None`` is returned so the caller treats it as a miss.

        Returns:
            name -> torch tensor (dtype as stored), or None when the entry is gone or invalid.
        """
        row = self._conn().execute("SELECT compat_key, nbytes, sha256 FROM entries WHERE id=?",
                                   (int(entry_id),)).fetchone()
        if row is None:
            return None
        compat_key, nbytes, digest = row
        try:
            blob = self._files.read_latent(int(entry_id), nbytes if isinstance(nbytes, int) else -1)
            if hashlib.sha256(blob).hexdigest() != digest:
                raise BlobError("latent file does not match its recorded SHA-256")
            check_safetensors(blob, self._spec(compat_key))
            return decode_latents(blob, device)
        except BlobError as exc:
            self._quarantine(int(entry_id), str(exc))
            return None

    def _quarantine(self, entry_id: int, reason: str) -> None:
        with self._lock:
            # Rows first, then the file (the eviction order): a crash in between leaves a stray
            # file, which the next open removes, never a row whose file is missing.
            with self._tx() as c:
                if c.execute("SELECT id FROM entries WHERE id=?", (entry_id,)).fetchone() is None:
                    return
                Manifest.delete_entries(c, [entry_id], Manifest.bump_generation(c))
                c.execute("UPDATE counters SET value=value+1 WHERE name='quarantined'")
                c.execute("UPDATE counters SET value=value+1 WHERE name='repairs'")
                self._event(c, "quarantined", f"entry {entry_id}: {reason}")
            if 0 < entry_id < 1 << 63:
                self._files.quarantine_latent(entry_id)
            self.sync()

    def entry(self, entry_id: int) -> EntryRecord | None:
        """The manifest record of one entry, or None."""
        conn = self._conn()
        row = conn.execute("SELECT id, compat_key, prompt, nbytes, created_at, last_access, access_count, info, "
                           "pinned=1, thumbnail IS NOT NULL FROM entries WHERE id=?", (int(entry_id),)).fetchone()
        if row is None:
            return None
        ents = [str(r[0]) for r in conn.execute("SELECT text FROM entities WHERE entry_id=? ORDER BY label", (row[0],))]
        info = _loads(row[7])
        return EntryRecord(int(row[0]), str(row[1]), str(row[2]), ents, int(row[3]), float(row[4]), float(row[5]),
                           int(row[6]), info if isinstance(info, dict) else {}, bool(row[8]), bool(row[9]))

    def entries(self) -> list[EntryRecord]:
        """Every entry, oldest first."""
        ids = [r[0] for r in self._conn().execute("SELECT id FROM entries ORDER BY id")]
        return [rec for rec in (self.entry(i) for i in ids) if rec is not None]

    def most_used(self, limit: int = 8) -> list[EntryRecord]:
        """The ``limit`` entries served most often (``access_count``; ties: the most recently used
        first). One top-N scan of ``entries`` (for the panel, not for requests)."""
        ids = [r[0] for r in self._conn().execute(
            "SELECT id FROM entries ORDER BY access_count DESC, last_access DESC, id DESC LIMIT ?", (max(0, int(limit)),))]
        return [rec for rec in (self.entry(i) for i in ids) if rec is not None]

    def entity_vectors(self, entry_ids: Sequence[int]) -> dict[int, np.ndarray]:
        """entry id -> [n, dim] float32 embeddings of its entities, in the order of :meth:`entry`'s
        ``entities`` (what copying an entry to another store needs). Unknown ids are left out."""
        out: dict[int, list] = {}
        if self.dim is None:
            return {}
        conn = self._conn()
        for entry_id in dict.fromkeys(int(i) for i in entry_ids):
            for (blob,) in conn.execute("SELECT embedding FROM entities WHERE entry_id=? ORDER BY label", (entry_id,)):
                if isinstance(blob, bytes) and len(blob) == 4 * self.dim:  # rows of another length are repaired on open
                    out.setdefault(entry_id, []).append(np.frombuffer(blob, dtype=np.float32))
        return {k: np.stack(v) for k, v in out.items()}

    def __len__(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    @property
    def generation(self) -> int:
        """Manifest generation: changes whenever an entry is inserted, evicted or removed."""
        return Manifest.generation(self._conn())

    def record_lookup(self, prompt: str, query_entities: Sequence[str], hit_entry: int | None,
                      entity: str | None, matched: str | None, similarity: float | None, ms: float) -> None:
        """Count one lookup: hit/miss counters, entity frequencies, the lookup log, and the
        served entry's recency/frequency (what LRU and LFU order by). One transaction.

        Best effort: statistics never fail a request. When the manifest cannot be written (disk
        full, locked, read-only) the lookup is not counted and a warning is logged once."""
        now = time.time()
        try:
            with self._tx() as c:
                c.execute("UPDATE counters SET value=value+1 WHERE name='lookups'")
                c.execute("UPDATE counters SET value=value+1 WHERE name=?",
                          ("hits" if hit_entry is not None else "misses",))
                c.execute("UPDATE counters SET value=value+? WHERE name='lookup_ms_sum'", (float(ms),))
                for text in dict.fromkeys(query_entities):
                    c.execute("INSERT INTO entity_counts VALUES(?,1) ON CONFLICT(text) DO UPDATE SET count=count+1",
                              (text,))
                cur = c.execute("INSERT INTO lookup_log(time, prompt, hit, entity, matched, similarity, ms, entry_id) "
                                "VALUES(?,?,?,?,?,?,?,?)",
                                (now, prompt[:500], int(hit_entry is not None), entity, matched, similarity, float(ms),
                                 None if hit_entry is None else int(hit_entry)))
                if cur.lastrowid % 100 == 0:
                    c.execute("DELETE FROM lookup_log WHERE id<=?", (cur.lastrowid - LOOKUP_LOG_KEEP,))
                if hit_entry is not None:
                    c.execute("UPDATE entries SET last_access=?, access_count=access_count+1 WHERE id=?",
                              (now, int(hit_entry)))
        except (sqlite3.Error, StoreError) as exc:
            if not self._stats_warned:
                self._stats_warned = True
                log.warning("CHAI store %s: lookup statistics not recorded (%s); requests go on",
                            self.path, sqlite_store_error(exc, self.path, "record the lookup")
                            if isinstance(exc, sqlite3.Error) else exc)

    def stats(self, last: int = 10) -> StoreStats:
        """Counters, sizes and recent lookups (see :class:`StoreStats`)."""
        stats = read_stats_from(self._conn(), self.path / MANIFEST_NAME, last)
        self._adopt_config(stats.budget_bytes, stats.policy)
        return stats

    def events(self, limit: int = 50) -> list[dict]:
        """The newest repair / quarantine events: dicts with time, kind, detail."""
        return [dict(zip(("time", "kind", "detail"), r)) for r in self._conn().execute(
            "SELECT time, kind, detail FROM events ORDER BY id DESC LIMIT ?", (int(limit),))]

    # ------------------------------------------------------------------ verify
    def verify(self, full: bool = True) -> VerifyReport:
        """Check the whole store and repair what is wrong.

        Checks every entry's file (a regular file of the recorded size; with ``full`` also its
        SHA-256 and safetensors header), removes the store's own files that no row names, lists
        files that are not the store's (``left_alone``, never touched), compares each index
        partition's live labels with the manifest (rebuilding it on any difference) and re-saves
        partition files that would not load as they are.

        Returns:
            A :class:`VerifyReport`; ``report.ok`` is True when nothing needed repair.
        """
        report = VerifyReport()
        with self._lock:
            self.sync()
            conn = self._conn()
            orphans = self._manifest.orphan_entities()
            if orphans:
                report.problems.append(f"{orphans} entity row(s) without their entry")
            bad = dict(self._sync.take_bad_entries())
            bad.update(self._manifest.invalid_entries() + self._manifest.invalid_entities(self.dim))
            for entry_id, reason in sorted(bad.items()):
                report.problems.append(f"entry {entry_id}: {reason}")
                report.rows_removed += 1
            self._remove_invalid(sorted(bad.items()))
            thumbs = self._clear_invalid_thumbnails()
            if thumbs:
                report.problems.append(f"{thumbs} entry row(s) with a thumbnail or pinned flag CHAI never writes "
                                       "(thumbnail dropped, entry unpinned)")
            rows = conn.execute("SELECT id FROM entries ORDER BY id").fetchall()
            report.entries_checked = len(rows)
            for (entry_id,) in rows:
                problem = self._check_entry(int(entry_id), full)
                if problem:
                    report.problems.append(f"entry {entry_id}: {problem}")
                    if "missing" in problem:
                        report.rows_removed += 1
                    else:
                        report.files_quarantined.append(f"{entry_id}.safetensors")
                    self._quarantine(int(entry_id), problem)
            live = {int(r[0]) for r in conn.execute("SELECT id FROM entries")}
            parts = {partition_file_name(r[0]) for r in conn.execute("SELECT compat_key FROM partitions WHERE typeof(compat_key)='text'")}
            legacy = conn.execute("SELECT 1 FROM meta WHERE key='upgraded_from'").fetchone() is not None
            cleanup = self._files.collect_garbage(live, parts, legacy)
            for name in cleanup.removed:
                report.problems.append(f"stray file {name}")
                report.orphans_removed.append(name.split("/", 1)[1])
            report.left_alone = cleanup.left_alone
            if self.index is not None:
                keys = set(r[0] for r in conn.execute("SELECT DISTINCT compat_key FROM entities WHERE typeof(compat_key)='text'"))
                for key in keys | set(self.index.keys()):
                    want = set(r[0] for r in conn.execute("SELECT label FROM entities WHERE compat_key=?", (key,)))
                    have = self.index.labels(key)
                    if want != have:
                        report.problems.append(f"index partition {partition_file_name(key)} has {len(have)} "
                                               f"vectors, the manifest {len(want)}")
                        report.partitions_rebuilt.append(partition_file_name(key))
                        self._sync.rebuild(key, "verify found a mismatch")
                for key in keys:  # the saved files must load as they are, or the next open would rebuild
                    problem = self._sync.saved_file_problem(key)
                    if problem:
                        report.problems.append(f"index partition {partition_file_name(key)}: {problem}; saved again")
                    self._sync.save(key)
        return report

    def _check_entry(self, entry_id: int, full: bool) -> str | None:
        """Why an entry's latent file cannot be served (None when it can)."""
        compat_key, nbytes, digest = self._conn().execute(
            "SELECT compat_key, nbytes, sha256 FROM entries WHERE id=?", (entry_id,)).fetchone()
        try:
            if not full:
                self._files.check_latent_size(entry_id, nbytes)
                return None
            blob = self._files.read_latent(entry_id, nbytes)
            if hashlib.sha256(blob).hexdigest() != digest:
                return "latent file does not match its recorded SHA-256"
            check_safetensors(blob, self._spec(compat_key))
        except BlobError as exc:
            return str(exc)
        return None

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Save the index if it changed and close every SQLite connection. Idempotent."""
        if self._closed:
            return
        try:
            if self.index is not None and self._sync.changes_since_save:
                try:
                    self.save_index()
                except (OSError, sqlite3.Error, StoreError) as exc:
                    self._report_index_save_failure(exc)
        finally:
            self._closed = True
            self._manifest.close()

    def __enter__(self) -> "LatentStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ StoreBackend members (cache/backend.py)
    @property
    def location(self) -> str:
        """The store folder as a resolved path string (the location it was opened from)."""
        return str(self.path)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    @property
    def budget_bytes(self) -> int:
        """The persisted byte budget (adopted: another process may have changed it)."""
        return self._policy_and_budget()[1]

    @property
    def policy(self) -> str:
        """The persisted eviction policy, ``"lru"``, ``"lfu"`` or ``"fifo"``."""
        return self._policy_and_budget()[0].value

    def set_policy(self, policy: str | EvictionPolicy) -> None:
        """Persist a new eviction policy; every process's next eviction follows it. Raises ValueError."""
        parsed = EvictionPolicy.parse(policy)
        with self._tx() as c:
            c.execute("UPDATE meta SET value=? WHERE key='policy'", (parsed.value,))
        self.config = replace(self.config, policy=parsed)

    def compat_keys(self) -> list[str]:
        """The distinct compatibility keys that hold entries, sorted."""
        return [r[0] for r in self._conn().execute(
            "SELECT DISTINCT compat_key FROM entries WHERE typeof(compat_key)='text' ORDER BY compat_key")]

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        """True when the folder ``path`` is a CHAI store (its marker, or a manifest of the previous
        format); nothing is created, opened for writing or changed."""
        try:
            return identify_folder(Path(path).expanduser().resolve())[0] in ("marked", "unmarked")
        except StoreError:
            return False


def _loads(text):
    """JSON from a manifest text field; None when it is not JSON."""
    try:
        return json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        return None


def _read_only_connection(path: Path) -> tuple[sqlite3.Connection, str | None]:
    """A read-only connection to the manifest of the store at ``path`` after the containment
    checks (the folder is a CHAI store; the manifest and its side files are regular files), and
    the marker's store id (None for an unmarked store)."""
    kind, found = identify_folder(path)
    if kind not in ("marked", "unmarked"):
        raise ContainmentError(f"{path} is not a CHAI store (no {MARKER_NAME} and no CHAI manifest in it)")
    StoreFiles(path).check_top_level(MANIFEST_SIDE_FILES)
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        raise StoreError(f"{path} is a CHAI store without a manifest (it was never used, or its manifest was "
                         "deleted); open it normally to recreate it")
    # mode=ro needs the WAL's shared-memory file to exist or be creatable; immutable=1 reads a
    # folder nobody can write (a read-only mount) straight from the database file.
    for immutable in (False, True):
        try:
            conn = connect_read_only(manifest, immutable)
        except sqlite3.Error:
            continue
        if schema_version(conn) is not None:
            return conn, (found["store_id"] if kind == "marked" else None)
        conn.close()
    raise StoreError(f"{manifest} is not a CHAI manifest this release reads, or it is damaged; nothing was changed")


def read_stats(path: str | os.PathLike, last: int = 10) -> StoreStats:
    """Statistics of a store without opening it for writing: for folders on read-only mounts, or
    stores another user owns. Nothing is repaired or locked and no store file is written (SQLite
    may add its -shm side file where the folder allows); a store being written at the same moment
    may show a state one insert old. The containment rules hold: a folder that is not a CHAI
    store, or a manifest that is a link, is refused before anything is opened.

    Args:
        path: the store folder.
        last: how many recent lookups to include.

    Returns:
        :class:`StoreStats`, the same fields :meth:`LatentStore.stats` gives.

    Raises:
        StoreError / ContainmentError: not a CHAI store, a manifest of another format, or a value
            in it that CHAI never writes (the message names it).
    """
    folder = Path(path).expanduser().resolve()
    conn, store_id = _read_only_connection(folder)
    try:
        stats = read_stats_from(conn, folder / MANIFEST_NAME, last)
        if store_id is not None:
            row = conn.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()
            if not row or row[0] != store_id:
                raise ContainmentError(f"{folder / MANIFEST_NAME} belongs to another store than its folder's marker")
        return stats
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {folder / MANIFEST_NAME} ({exc}); it is damaged") from exc
    finally:
        conn.close()
