"""The store's own files: its marker, latent blobs, index files and quarantine, kept inside the store.

Every path is derived by the store from an entry id or a compatibility key; the manifest never
names a file::

    chai-store.json                               marker: format, version, store id
    latents/<entry id>.safetensors                one entry's latents
    latents/put-<32 hex>.tmp                      a latent file being written
    index/index-<16 hex>.bin                      one hnswlib partition (named from its key)
    index/index-<16 hex>.bin.tmp-<32 hex>         a partition being written
    quarantine/<entry id>-<16 hex>.safetensors    a bad latent file, moved aside
    store.lock                                    the writer lock

Containment (docs/store_security.md): ``latents/``, ``index/`` and ``quarantine/`` are opened with
``O_NOFOLLOW | O_DIRECTORY`` relative to a descriptor of the store folder, and every file operation
is relative to those descriptors (openat, unlinkat, renameat), so a link planted anywhere in a store
never redirects a read, a write or a delete outside it. Files are opened with ``O_NOFOLLOW`` (and
``O_NONBLOCK``, so a FIFO cannot block the open) and must be regular files; sizes are checked with
``fstat`` before any byte is read. Clean-up removes only regular files whose names match the
patterns above (and, in a store upgraded from format 1, that release's names); anything else is
reported and left alone. Where the OS has no ``dir_fd`` support (Windows) the same checks run on
paths with ``lstat`` first.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import struct
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from .store_types import ALLOWED_DTYPES, MAX_ENTRY_BYTES, ContainmentError

__all__ = [
    "BlobError",
    "StoreFiles",
    "CleanupReport",
    "check_safetensors",
    "decode_latents",
    "tensor_spec",
    "EncodedEntry",
    "encode_entry",
    "spec_mismatch",
    "latent_name",
    "MARKER_NAME",
    "FORMAT_NAME",
    "STORE_SUBDIRS",
    "MANIFEST_NAME",
    "LOCK_NAME",
]

MARKER_NAME = "chai-store.json"
FORMAT_NAME = "comfyui-chai-store"
MANIFEST_NAME = "manifest.sqlite"
LOCK_NAME = "store.lock"
STORE_SUBDIRS = ("latents", "index", "quarantine")
MAX_MARKER_BYTES = 4096
# A safetensors header of ours is under 1 KB (a few tensor names); 1 MiB leaves room and stops a
# crafted 8-byte length from making us parse gigabytes of JSON.
MAX_HEADER_BYTES = 1 << 20
# safetensors dtype name -> (torch dtype name, bytes per element)
_ST_DTYPES = {"F16": ("float16", 2), "BF16": ("bfloat16", 2), "F32": ("float32", 4)}

_LATENT_RE = re.compile(r"^([1-9][0-9]{0,18})\.safetensors$")
_LATENT_TMP_RE = re.compile(r"^put-[0-9a-f]{32}\.tmp$")
_INDEX_RE = re.compile(r"^index-[0-9a-f]{16}\.bin$")
_INDEX_TMP_RE = re.compile(r"^index-[0-9a-f]{16}\.bin\.tmp-[0-9a-f]{32}$")
# Names the format-1 release wrote (uuid4 hex latents, pid-suffixed temp files).
_V1_LATENT_RE = re.compile(r"^[0-9a-f]{32}\.safetensors(\.tmp[0-9]+)?$")
_V1_INDEX_TMP_RE = re.compile(r"^index-[0-9a-f]{16}\.bin\.tmp[0-9]+$")

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_READ_FLAGS = os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_BINARY | _O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_BINARY | _O_CLOEXEC
# openat/unlinkat/renameat/fstatat relative to directory descriptors (Linux, macOS, BSD).
USE_DIR_FD = bool(_O_NOFOLLOW and _O_DIRECTORY) and all(
    f in os.supports_dir_fd for f in (os.open, os.unlink, os.rename, os.stat, os.mkdir)) and os.scandir in os.supports_fd


class BlobError(Exception):
    """One file of the store is missing, a link, a special file, of the wrong size or malformed.

    The message says which and why (e.g. ``latent file is 12 bytes, the manifest recorded 1888``);
    the store quarantines the entry and treats it as a miss.
    """


def latent_name(entry_id: int) -> str:
    """``<entry id>.safetensors``: the latent file name of an entry (ids are positive int64)."""
    entry_id = int(entry_id)
    if not 0 < entry_id < 1 << 63:
        raise ValueError(f"entry id {entry_id} is not a positive 64-bit integer")
    return f"{entry_id}.safetensors"


@dataclass
class CleanupReport:
    """What :meth:`StoreFiles.collect_garbage` did: ``removed`` (store-made files nothing names)
    and ``left_alone`` (files the store did not make, reported and never touched), as ``sub/name``."""

    removed: list[str] = field(default_factory=list)
    left_alone: list[str] = field(default_factory=list)


class _Dir:
    """One verified directory of the store: a descriptor (``fd``) where the OS supports ``dir_fd``,
    else its path (``path``) checked with ``lstat``. Every method takes a plain file name."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self.fd = fd

    def open(self, name: str, flags: int, mode: int = 0o644) -> int:
        if self.fd is not None:
            return os.open(name, flags, mode, dir_fd=self.fd)
        target = self.path / name
        if os.path.islink(target):
            raise OSError(errno.ELOOP, "is a symbolic link", str(target))
        return os.open(target, flags, mode)

    def lstat(self, name: str) -> os.stat_result:
        if self.fd is not None:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        return os.lstat(self.path / name)

    def unlink(self, name: str) -> None:
        if self.fd is not None:
            os.unlink(name, dir_fd=self.fd)
        else:
            os.unlink(self.path / name)

    def rename(self, name: str, dest: "_Dir", dest_name: str) -> None:
        if self.fd is not None and dest.fd is not None:
            os.rename(name, dest_name, src_dir_fd=self.fd, dst_dir_fd=dest.fd)
        else:
            os.replace(self.path / name, dest.path / dest_name)

    def entries(self) -> list[tuple[str, bool]]:
        """(name, is a regular file) of everything in the folder; links and special files are not
        regular. Types come from the directory listing where the file system gives them."""
        with os.scandir(self.fd if self.fd is not None else self.path) as it:
            return [(e.name, e.is_file(follow_symlinks=False)) for e in it]

    def fsync(self) -> None:
        if self.fd is not None:
            try:
                os.fsync(self.fd)
            except OSError:
                pass  # some file systems refuse fsync on directories; the rename is still atomic
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # Windows cannot open a directory; NTFS renames are journaled
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def regular(self, name: str) -> bool:
        """True when ``name`` is a regular file (not a link, folder, FIFO or device)."""
        try:
            return stat.S_ISREG(self.lstat(name).st_mode)
        except FileNotFoundError:
            return False


class StoreFiles:
    """The files of one store folder, touched only through verified directories.

    Args:
        root: the store folder (resolved, absolute).

    Raises of every method: :class:`~comfyui_chai.cache.store_types.ContainmentError` when a store
    folder (``latents/``, ``index/``, ``quarantine/``) is a link or not a folder;
    :class:`BlobError` for one bad file; ``OSError`` for I/O failures (disk full, read-only).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------ folders
    @contextmanager
    def folder(self, sub: str | None = None, create: bool = False) -> Iterator[_Dir]:
        """A verified directory of the store: the root (``sub=None``) or one of ``STORE_SUBDIRS``.

        ``create`` makes a missing subfolder. Raises ContainmentError (link or not a folder),
        FileNotFoundError (missing and not created).
        """
        if not USE_DIR_FD:
            if sub is not None:
                path = self.root / sub
                if create and not os.path.lexists(path):
                    os.mkdir(path)
                self._check_dir_path(path, sub)
                yield _Dir(path, None)
            else:
                yield _Dir(self.root, None)
            return
        root_fd = os.open(self.root, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        try:
            if sub is None:
                yield _Dir(self.root, root_fd)
                return
            try:
                fd = os.open(sub, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=root_fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(sub, 0o755, dir_fd=root_fd)
                except FileExistsError:
                    pass  # made by another process meanwhile
                fd = os.open(sub, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=root_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise self._not_a_folder(sub) from exc
                raise
            try:
                yield _Dir(self.root / sub, fd)
            finally:
                os.close(fd)
        finally:
            os.close(root_fd)

    def _check_dir_path(self, path: Path, sub: str) -> None:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise self._not_a_folder(sub)

    def _not_a_folder(self, sub: str) -> ContainmentError:
        return ContainmentError(
            f"{self.root / sub} is a link or not a folder; a CHAI store's {sub}/ must be a real folder inside "
            "it (a store never follows links out of itself): remove or replace it, or use another store")

    def make_folders(self) -> None:
        """Create missing ``latents/``, ``index/`` and ``quarantine/`` and check all three."""
        for sub in STORE_SUBDIRS:
            with self.folder(sub, create=True):
                pass

    def check_top_level(self, names: tuple[str, ...]) -> None:
        """Each of ``names`` in the store folder, where present, must be a regular file (not a link,
        folder or device): ``manifest.sqlite`` and its side files, ``store.lock``, the marker.

        Raises:
            ContainmentError: naming the file.
        """
        with self.folder() as root:
            for name in names:
                try:
                    st = root.lstat(name)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                    raise ContainmentError(
                        f"{self.root / name} is {kind}; a CHAI store opens only its own regular files: "
                        "remove it (or restore the store's own file), or use another store")

    def ensure_lock_file(self) -> Path:
        """Create ``store.lock`` if missing (never through a link) and return its path."""
        self.check_top_level((LOCK_NAME,))
        with self.folder() as root:
            try:
                os.close(root.open(LOCK_NAME, _CREATE_FLAGS, 0o644))
            except FileExistsError:
                pass
        self.check_top_level((LOCK_NAME,))
        return self.root / LOCK_NAME

    # ------------------------------------------------------------------ marker
    def read_marker(self) -> dict | None:
        """The marker's JSON object, or None when there is no marker.

        Raises:
            ContainmentError: the marker is a link, too large, or not a JSON object.
        """
        with self.folder() as root:
            try:
                fd = root.open(MARKER_NAME, _READ_FLAGS)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise ContainmentError(f"{self.root / MARKER_NAME} cannot be read safely ({exc.strerror}); "
                                       "it must be a regular file, not a link") from exc
            try:
                data = _read_regular(fd, MAX_MARKER_BYTES, exact=None)
            except BlobError as exc:
                raise ContainmentError(f"{self.root / MARKER_NAME}: {exc}") from exc
            finally:
                os.close(fd)
        try:
            marker = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ContainmentError(f"{self.root / MARKER_NAME} is not a CHAI store marker (not JSON); "
                                   "this folder was not made by CHAI: give a new folder") from exc
        if not isinstance(marker, dict):
            raise ContainmentError(f"{self.root / MARKER_NAME} is not a CHAI store marker; give a new folder")
        return marker

    def write_marker(self, marker: Mapping) -> None:
        """Write the marker atomically (temp file, fsync, rename)."""
        data = (json.dumps(dict(marker), indent=2, sort_keys=True) + "\n").encode("utf-8")
        tmp = f".{MARKER_NAME}.tmp-{uuid.uuid4().hex}"
        with self.folder() as root:
            fd = root.open(tmp, _CREATE_FLAGS, 0o644)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                root.rename(tmp, root, MARKER_NAME)
            except BaseException:
                _unlink_quietly(root, tmp)
                raise
            root.fsync()

    # ------------------------------------------------------------------ latents
    def read_latent(self, entry_id: int, nbytes: int) -> bytes:
        """The bytes of an entry's latent file, after ``fstat`` says it is a regular file of exactly
        ``nbytes`` (at most ``MAX_ENTRY_BYTES``) bytes.

        Raises:
            BlobError: missing, a link, a special file, another size, or unreadable.
        """
        if not 0 < int(nbytes) <= MAX_ENTRY_BYTES:
            raise BlobError(f"the manifest records {nbytes} bytes for this entry, outside 1..{MAX_ENTRY_BYTES}")
        name = latent_name(entry_id)
        try:
            with self.folder("latents") as d:
                fd = d.open(name, _READ_FLAGS)
                try:
                    return _read_regular(fd, MAX_ENTRY_BYTES, exact=int(nbytes))
                finally:
                    os.close(fd)
        except FileNotFoundError:
            raise BlobError("latent file is missing") from None
        except BlobError:
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BlobError("latent file is a symbolic link") from exc
            raise BlobError(f"latent file cannot be read ({exc.strerror or exc})") from exc

    def check_latent_size(self, entry_id: int, nbytes: int) -> None:
        """Check, without reading it, that an entry's latent file is a regular file of ``nbytes`` bytes.

        Raises:
            BlobError: missing, a link, a special file, or another size.
        """
        try:
            with self.folder("latents") as d:
                st = d.lstat(latent_name(entry_id))
        except FileNotFoundError:
            raise BlobError("latent file is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise BlobError("latent file is a link or not a regular file")
        if st.st_size != nbytes:
            raise BlobError(f"latent file is {st.st_size} bytes, the manifest recorded {nbytes}")

    def write_latent_temp(self, blob: bytes, durable: bool) -> str:
        """Write ``blob`` to a fresh ``latents/put-<hex>.tmp`` (exclusive create, no links followed,
        fsync when ``durable``) and return its name. The caller publishes or discards it."""
        tmp = f"put-{uuid.uuid4().hex}.tmp"
        with self.folder("latents", create=True) as d:
            fd = d.open(tmp, _CREATE_FLAGS, 0o644)
            try:
                _write_all(fd, blob)
                if durable:
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                _unlink_quietly(d, tmp)
                raise
            os.close(fd)
        return tmp

    def publish_latent(self, tmp: str, entry_id: int, durable: bool) -> None:
        """Rename a temp file from :meth:`write_latent_temp` to ``latents/<entry_id>.safetensors``."""
        with self.folder("latents") as d:
            d.rename(tmp, d, latent_name(entry_id))
            if durable:
                d.fsync()

    def discard_temp(self, tmp: str) -> None:
        """Remove a temp latent file (best effort: a leftover is cleaned on the next open)."""
        try:
            with self.folder("latents") as d:
                _unlink_quietly(d, tmp)
        except (OSError, ContainmentError):
            pass

    def remove_latent(self, entry_id: int) -> bool:
        """Delete an entry's latent file if it is a regular file; True when one was deleted.

        A link or special file under the entry's name is not the store's: left alone."""
        name = latent_name(entry_id)
        try:
            with self.folder("latents") as d:
                if not d.regular(name):
                    return False
                d.unlink(name)
                return True
        except FileNotFoundError:
            return False

    def quarantine_latent(self, entry_id: int) -> str | None:
        """Move an entry's latent file (a regular file only) to ``quarantine/<id>-<hex>.safetensors``.

        Returns the quarantined name, or None when there was no regular file to move."""
        name = latent_name(entry_id)
        dest = f"{int(entry_id)}-{uuid.uuid4().hex[:16]}.safetensors"
        with self.folder("latents") as src, self.folder("quarantine", create=True) as q:
            if not src.regular(name):
                return None
            src.rename(name, q, dest)
        return dest

    # ------------------------------------------------------------------ index files
    @contextmanager
    def open_index(self, name: str) -> Iterator[tuple[int, int, str]]:
        """Open ``index/<name>`` for reading: yields (fd, size in bytes, a path hnswlib can open
        that names this very file: ``/proc/self/fd/<fd>`` where it exists).

        Raises:
            BlobError: missing, a link or not a regular file.
        """
        if not _INDEX_RE.match(name):
            raise ValueError(f"{name!r} is not an index file name of the store")
        try:
            with self.folder("index") as d:
                fd = d.open(name, _READ_FLAGS)
        except FileNotFoundError:
            raise BlobError(f"index file {name} is missing") from None
        except OSError as exc:
            raise BlobError(f"index file {name} cannot be opened safely ({exc.strerror or exc})") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BlobError(f"index file {name} is not a regular file")
            yield fd, int(st.st_size), _fd_path(fd, self.root / "index" / name)
        finally:
            os.close(fd)

    @contextmanager
    def new_index(self, name: str, durable: bool) -> Iterator[tuple[int, str]]:
        """A fresh exclusive temp file for partition ``name``: yields (fd, path for hnswlib's
        ``save_index``); on normal exit it is fsynced and renamed over ``index/<name>``."""
        if not _INDEX_RE.match(name):
            raise ValueError(f"{name!r} is not an index file name of the store")
        tmp = f"{name}.tmp-{uuid.uuid4().hex}"
        with self.folder("index", create=True) as d:
            fd = d.open(tmp, (_CREATE_FLAGS & ~os.O_WRONLY) | os.O_RDWR, 0o644)
            try:
                yield fd, _fd_path(fd, self.root / "index" / tmp)
                if durable:
                    os.fsync(fd)
                d.rename(tmp, d, name)
                if durable:
                    d.fsync()
            except BaseException:
                _unlink_quietly(d, tmp)
                raise
            finally:
                os.close(fd)

    def remove_index(self, name: str) -> None:
        """Delete ``index/<name>`` if it is a regular file of the store's naming pattern."""
        if not _INDEX_RE.match(name):
            return
        try:
            with self.folder("index") as d:
                if d.regular(name):
                    d.unlink(name)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ clean-up
    def collect_garbage(self, live_ids: set[int], partition_names: set[str], legacy: bool) -> CleanupReport:
        """Remove what an interrupted write or a dropped partition left, and nothing else.

        Removed (regular files only): ``latents/<id>.safetensors`` whose id is not in ``live_ids``,
        temp files, ``index/index-*.bin`` not in ``partition_names``, and with ``legacy`` the
        format-1 release's names. Everything else in ``latents/`` and ``index/`` is listed in
        ``left_alone``. Run only under the writer lock.
        """
        report = CleanupReport()

        def stale(sub: str, name: str) -> bool | None:
            """True: the store made it and nothing needs it; False: the store's and in use; None: not the store's."""
            if sub == "latents":
                if name.endswith(".safetensors") and _LATENT_RE.match(name):
                    return int(name[:-12]) not in live_ids
                if _LATENT_TMP_RE.match(name) or (legacy and _V1_LATENT_RE.match(name)):
                    return True
            else:
                if _INDEX_RE.match(name):
                    return name not in partition_names
                if _INDEX_TMP_RE.match(name) or (legacy and _V1_INDEX_TMP_RE.match(name)):
                    return True
            return None

        for sub in ("latents", "index"):
            try:
                with self.folder(sub) as d:
                    for name, regular in d.entries():  # file types from the directory: no stat per file
                        verdict = stale(sub, name) if regular else None
                        if verdict:
                            _unlink_quietly(d, name)
                            report.removed.append(f"{sub}/{name}")
                        elif verdict is None:
                            report.left_alone.append(f"{sub}/{name}")
            except FileNotFoundError:
                continue
        return report

    def rename_legacy_latent(self, old: str, entry_id: int) -> bool:
        """Upgrade step: rename a format-1 latent (``<uuid hex>.safetensors``) to its entry id's name.

        Idempotent: returns True when the entry's file is in place afterwards (renamed now, or
        earlier by an interrupted upgrade), False when neither name holds a regular file."""
        if not _V1_LATENT_RE.match(old) or old.endswith(".tmp"):
            return False
        with self.folder("latents") as d:
            if d.regular(old):
                d.rename(old, d, latent_name(entry_id))
                return True
            return d.regular(latent_name(entry_id))


def tensor_spec(tensors: Mapping[str, object]) -> dict:
    """Validate an entry's latent tensors and describe them: ``{name: [dtype, shape]}``, sorted by name
    (what every entry of one compatibility key must match, and what :func:`check_safetensors` checks a
    stored file against).

    Raises:
        ValueError: not a non-empty mapping of names to torch tensors; a reserved or empty name; a dtype
            outside ``ALLOWED_DTYPES``; an empty or 0-d tensor; NaN or Inf.
    """
    import torch

    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError("tensors must be a non-empty mapping of name -> torch.Tensor")
    spec = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError("tensor names must be non-empty strings")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved by safetensors; give the tensor another name")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"tensor {name!r} is a {type(value).__name__}, expected a torch.Tensor")
        dtype = str(value.dtype).replace("torch.", "")
        if dtype not in ALLOWED_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}; latents must be one of {', '.join(ALLOWED_DTYPES)}")
        if value.numel() == 0 or value.dim() == 0:
            raise ValueError(f"tensor {name!r} has shape {list(value.shape)}; latents must be non-empty arrays")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"tensor {name!r} contains NaN or Inf; refusing to cache a diverged latent")
        spec[name] = [dtype, list(value.shape)]
    return dict(sorted(spec.items()))


@dataclass(frozen=True)
class EncodedEntry:
    """One entry checked and serialised, ready for a store's insert (both backends write these bytes).

    Attributes:
        blob: the safetensors file (bytes). sha256: its hex digest. spec: :func:`tensor_spec`.
        entities: entity strings. embeddings: [len(entities), dim] float32.
    """

    blob: bytes
    sha256: str
    spec: dict
    entities: list
    embeddings: np.ndarray

    @property
    def nbytes(self) -> int:
        """Size of the latent file (bytes): what the budget counts."""
        return len(self.blob)


def encode_entry(tensors: Mapping[str, object], entities, embeddings, compat_key: str, prompt: str,
                 dim: int | None) -> EncodedEntry:
    """Check a ``put``'s arguments and serialise its latents (safetensors, the key in its metadata).

    Args:
        tensors: name -> torch tensor (see :func:`tensor_spec`). entities: strings, one per embedding.
        embeddings: [len(entities), dim] float32. compat_key: non-empty string. prompt: string.
        dim: the store's embedding width, or None before its first entry.

    Raises:
        ValueError: naming the first argument that is wrong.
    """
    from safetensors.torch import save

    if not compat_key or not isinstance(compat_key, str):
        raise ValueError("compat_key must be a non-empty string")
    if not isinstance(prompt, str):
        raise ValueError("prompt must be a string")
    spec = tensor_spec(tensors)
    if isinstance(entities, (str, bytes)):  # would silently become one entity per character
        raise ValueError("entities must be a list of strings, e.g. ['a golden retriever'], not one string")
    entities = [str(e) for e in entities]
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if not entities:
        raise ValueError("an entry needs at least one entity to be found by")
    if embeddings.ndim != 2 or embeddings.shape[0] != len(entities):
        raise ValueError(f"embeddings must be [{len(entities)}, dim], got {list(embeddings.shape)}")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or Inf")
    if dim is not None and embeddings.shape[1] != dim:
        raise ValueError(f"embeddings are {embeddings.shape[1]}-d but the store holds {dim}-d vectors")
    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"compat_key": compat_key[:512]})
    return EncodedEntry(blob, hashlib.sha256(blob).hexdigest(), spec, entities, embeddings)


def spec_mismatch(spec: dict, stored) -> ValueError:
    """The error for an entry whose tensors differ from those already stored under its key."""
    return ValueError(f"entry tensors {spec} differ from those already stored under this key {stored}; the "
                      "compatibility key must include the latent shape and dtype")


def check_safetensors(blob: bytes, spec: Mapping[str, list]) -> None:
    """Check a safetensors file's header before any tensor is built from it.

    The header (an 8-byte little-endian length, then JSON) must describe exactly the tensors of
    ``spec`` ({name: [dtype, shape]}, dtype one of ``ALLOWED_DTYPES``) with offsets that tile the
    data area from 0 to its end without gap or overlap, each ``numel x itemsize`` bytes long.

    Raises:
        BlobError: naming the first field that is wrong.
    """
    if len(blob) < 8:
        raise BlobError("latent file is not valid safetensors (shorter than its 8-byte header length)")
    (header_len,) = struct.unpack_from("<Q", blob, 0)
    if header_len < 2 or header_len > MAX_HEADER_BYTES or 8 + header_len > len(blob):
        raise BlobError(f"latent file is not valid safetensors (header length {header_len} for a file of "
                        f"{len(blob)} bytes)")
    try:
        header = json.loads(bytes(blob[8:8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BlobError(f"latent file is not valid safetensors (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise BlobError("latent file is not valid safetensors (header is not a JSON object)")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise BlobError("latent file is not valid safetensors (__metadata__ must map strings to strings)")
    if sorted(header) != sorted(spec):
        raise BlobError(f"latent file holds tensors {sorted(header)[:8]}, the store expects {sorted(spec)}")
    data_len = len(blob) - 8 - header_len
    spans = []
    for name, desc in header.items():
        want_dtype, want_shape = spec[name]
        if not isinstance(desc, dict) or set(desc) != {"dtype", "shape", "data_offsets"}:
            raise BlobError(f"latent file is not valid safetensors (tensor {name!r} lacks dtype/shape/data_offsets)")
        dtype, shape, offsets = desc["dtype"], desc["shape"], desc["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES or _ST_DTYPES[dtype][0] != want_dtype:
            raise BlobError(f"tensor {name!r} has dtype {dtype!r:.40}, the store expects {want_dtype}")
        if not isinstance(shape, list) or shape != list(want_shape) or not all(
                type(x) is int and x > 0 for x in shape):
            raise BlobError(f"tensor {name!r} has shape {shape!r:.80}, the store expects {list(want_shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)):
            raise BlobError(f"tensor {name!r} has data_offsets {offsets!r:.80}, not two integers")
        numel = 1
        for x in shape:
            numel *= x
        begin, end = offsets
        if not 0 <= begin <= end <= data_len or end - begin != numel * _ST_DTYPES[dtype][1]:
            raise BlobError(f"tensor {name!r} has data_offsets {offsets} that do not fit its shape or the file")
        spans.append((begin, end))
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise BlobError("latent file is not valid safetensors (tensor data has gaps or overlaps)")
        position = end
    if position != data_len:
        raise BlobError(f"latent file is not valid safetensors ({data_len - position} bytes after the last tensor)")


def decode_latents(blob: bytes, device: str = "cpu") -> dict:
    """Build an entry's tensors from latent bytes already checked by :func:`check_safetensors` (or
    the PostgreSQL store's equivalent): name -> torch tensor in its stored dtype, moved to ``device``.

    Shared by the folder and the PostgreSQL store so both fail the same way.

    Raises:
        BlobError: the bytes are not a safetensors file safetensors can load (the caller quarantines).
    """
    from safetensors.torch import load as load_bytes

    try:
        tensors = load_bytes(blob)
    except Exception as exc:  # safetensors raises SafetensorError on a malformed file
        raise BlobError(f"latents are not valid safetensors ({exc})") from None
    if device != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


def _read_regular(fd: int, cap: int, exact: int | None) -> bytes:
    """Read a whole file through ``fd`` after ``fstat`` shows a regular file of at most ``cap``
    bytes (exactly ``exact`` when given). Raises BlobError."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise BlobError("not a regular file (a device, FIFO or folder)")
    size = int(st.st_size)
    if exact is not None and size != exact:
        raise BlobError(f"latent file is {size} bytes, the manifest recorded {exact}")
    if size > cap:
        raise BlobError(f"file is {size} bytes, more than the {cap} allowed")
    chunks, got = [], 0
    while got < size:
        block = os.read(fd, min(size - got, 1 << 24))
        if not block:
            break
        chunks.append(block)
        got += len(block)
    if got != size or os.read(fd, 1):
        raise BlobError(f"file changed size while it was read ({got} of {size} bytes)")
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink_quietly(d: _Dir, name: str) -> None:
    try:
        d.unlink(name)
    except OSError:
        pass


def _fd_path(fd: int, fallback: Path) -> str:
    """A path naming the open file ``fd`` itself (Linux ``/proc/self/fd``), so a library that
    opens by path gets the file we checked even if its name is swapped meanwhile."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else str(fallback)
