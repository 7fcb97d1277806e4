"""Which hnswlib index files may be loaded: a keyed checksum, else a full structural check.

hnswlib's ``loadIndex`` trusts the file: an entry point, a neighbour id or a level out of range
makes a later query read outside its arrays (a segfault that takes ComfyUI down), and a large
``max_elements`` or link-list size makes it allocate whatever the file says. A store from
elsewhere (or a manifest that records a checksum of a crafted file) must never reach it. So an
index file is loaded only when

1. it carries a keyed checksum (HMAC-SHA256) made by this user on this machine, with a secret
   kept outside every store (:class:`IndexKey`: ``~/.config/comfyui-chai/index-key``, mode 0600),
   which someone who only wrote the store cannot forge; or
2. it passes :func:`check_hnsw_file`, which checks every field hnswlib trusts (the layout of
   ``hnswalg.h`` ``saveIndex``/``loadIndex``, hnswlib 0.8): header sizes against our dimension and
   M, the entry point and max level, every element's level, every neighbour count and id at every
   level, the level of every neighbour, unique labels, finite vectors and the exact file size.

Otherwise the store rebuilds the partition from the manifest's vectors (always safe).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import stat
import struct
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["IndexFileError", "HnswFileInfo", "check_hnsw_file", "IndexKey", "config_dir", "HNSW_HEADER_BYTES"]

log = logging.getLogger("comfyui_chai.store")

# offsetLevel0_, max_elements_, cur_element_count, size_data_per_element_, label_offset_, offsetData_
# (size_t), maxlevel_ (int), enterpoint_node_ (tableint = uint32), maxM_, maxM0_, M_ (size_t),
# mult_ (double), ef_construction_ (size_t): 96 bytes, little-endian on every platform we run on.
_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
HNSW_HEADER_BYTES = _HEADER.size
_LINK_COUNT_MASK = 0xFFFF  # getListCount reads the low 16 bits; byte 2 holds the delete mark
_DELETE_MARK = 0x01
MAX_LEVEL = 64  # M >= 2 gives mult <= 1.45: level 64 has probability < e^-44 per element


class IndexFileError(RuntimeError):
    """An index file is missing, truncated, corrupt or does not match its recorded checksum."""


@dataclass
class HnswFileInfo:
    """What a structurally valid hnswlib file holds.

    Attributes:
        count: elements stored (live and deleted). labels: [count] int64, unique.
        deleted: [count] bool, hnswlib's delete marks. max_level: top level of the graph (-1 if empty).
    """

    count: int
    labels: np.ndarray
    deleted: np.ndarray
    max_level: int


def check_hnsw_file(buf, dim: int, M: int, ef_construction: int, max_count: int) -> HnswFileInfo:
    """Check every field of an hnswlib 0.8 file (``HierarchicalNSW::saveIndex`` layout) that
    ``loadIndex`` and later queries and inserts trust, without handing it to hnswlib.

    Args:
        buf: the whole file (bytes, mmap or memoryview).
        dim: vector dimension of the store (float32 vectors).
        M / ef_construction: the store's hnswlib parameters (``IndexParams``).
        max_count: most elements the file may hold (the manifest's live plus deleted labels).

    Returns:
        :class:`HnswFileInfo`.

    Raises:
        IndexFileError: naming the first field that is wrong.
    """
    size = len(buf)
    if size < HNSW_HEADER_BYTES:
        raise IndexFileError(f"index file is {size} bytes, shorter than hnswlib's {HNSW_HEADER_BYTES}-byte header")
    (offset_level0, max_elements, count, size_data, label_offset, offset_data, max_level, enterpoint,
     max_m, max_m0, m, mult, ef_c) = _HEADER.unpack_from(buf, 0)
    links0 = 2 * M * 4 + 4
    want = {"offsetLevel0": (offset_level0, 0), "maxM": (max_m, M), "maxM0": (max_m0, 2 * M), "M": (m, M),
            "offsetData": (offset_data, links0), "label_offset": (label_offset, links0 + 4 * dim),
            "size_data_per_element": (size_data, links0 + 4 * dim + 8),
            "ef_construction": (ef_c, max(ef_construction, M))}
    for name, (got, expected) in want.items():
        if got != expected:
            raise IndexFileError(f"index header field {name} is {got}, this store's index needs {expected}")
    if not math.isclose(mult, 1.0 / math.log(M), rel_tol=1e-12):
        raise IndexFileError(f"index header field mult is {mult!r}, hnswlib sets 1/ln(M) = {1 / math.log(M)!r}")
    if count > max_count or count > max_elements:
        raise IndexFileError(f"index holds {count} elements, more than its capacity {max_elements} or the "
                             f"{max_count} the manifest knows")
    if count == 0:
        if enterpoint != 0xFFFFFFFF or max_level != -1 or size != HNSW_HEADER_BYTES:
            raise IndexFileError("empty index with an entry point, a level or trailing data")
        return HnswFileInfo(0, np.zeros(0, np.int64), np.zeros(0, bool), -1)
    level0_end = HNSW_HEADER_BYTES + count * size_data
    if level0_end + 4 * count > size:
        raise IndexFileError(f"index file is {size} bytes, too short for {count} elements")
    # Level 0, in chunks copied out of ``buf`` (no view of a caller's mmap outlives this call, and
    # a large file is never copied whole): link counts and ids, vectors, labels, delete marks.
    labels_parts, deleted_parts = [], []
    step = max(1, (16 << 20) // size_data)
    for first in range(0, count, step):
        n = min(step, count - first)
        start = HNSW_HEADER_BYTES + first * size_data
        level0 = np.frombuffer(bytes(buf[start:start + n * size_data]), dtype=np.uint8).reshape(n, size_data)
        head = level0[:, :4].copy().view(np.uint32)[:, 0]
        counts0 = head & _LINK_COUNT_MASK
        if int(counts0.max()) > 2 * M:
            raise IndexFileError(f"an element has {int(counts0.max())} level-0 neighbours, more than maxM0 = {2 * M}")
        neighbours0 = level0[:, 4:links0].copy().view(np.uint32)
        used0 = np.arange(2 * M)[None, :] < counts0[:, None]
        if used0.any() and int(neighbours0[used0].max()) >= count:
            raise IndexFileError("a level-0 neighbour id points past the last element")
        if not np.isfinite(level0[:, links0:links0 + 4 * dim].copy().view(np.float32)).all():
            raise IndexFileError("the index holds a vector with NaN or Inf")
        labels_parts.append(level0[:, label_offset:label_offset + 8].copy().view(np.uint64)[:, 0])
        deleted_parts.append(((head >> 16) & _DELETE_MARK).astype(bool))
    labels = np.concatenate(labels_parts)
    if int(labels.max()) >= 1 << 63 or int(labels.min()) < 1 or np.unique(labels).size != count:
        raise IndexFileError("index labels are not unique positive 63-bit integers")
    deleted = np.concatenate(deleted_parts)

    # Upper levels: per element a uint32 byte size, then `level` blocks of (count, maxM ids).
    links = M * 4 + 4
    levels = np.zeros(count, dtype=np.int64)
    blocks: list[bytes] = []
    position = level0_end
    unpack = struct.Struct("<I").unpack_from
    for i in range(count):
        if position + 4 > size:
            raise IndexFileError(f"index file ends inside element {i}'s link lists")
        (nbytes,) = unpack(buf, position)
        position += 4
        if nbytes:
            if nbytes % links or nbytes // links > MAX_LEVEL or position + nbytes > size:
                raise IndexFileError(f"element {i} has link lists of {nbytes} bytes (not whole levels of "
                                     f"{links} bytes, above level {MAX_LEVEL}, or past the end of the file)")
            levels[i] = nbytes // links
            blocks.append(bytes(buf[position:position + nbytes]))
            position += nbytes
    if position != size:
        raise IndexFileError(f"index file has {size - position} bytes after the last element")
    top = int(levels.max())
    if max_level != top:
        raise IndexFileError(f"index header says max level {max_level}, its elements reach level {top}")
    if enterpoint >= count or levels[enterpoint] != top:
        raise IndexFileError(f"index entry point {enterpoint} is not an element on the top level")
    if blocks:
        upper = np.frombuffer(b"".join(blocks), dtype=np.uint32).reshape(-1, M + 1)
        block_level = np.concatenate([np.arange(1, n + 1) for n in levels[levels > 0]])
        counts = upper[:, 0] & _LINK_COUNT_MASK
        if int(counts.max()) > M:
            raise IndexFileError(f"an element has {int(counts.max())} upper-level neighbours, more than maxM = {M}")
        used = np.arange(M)[None, :] < counts[:, None]
        ids = upper[:, 1:][used]
        if ids.size:
            if int(ids.max()) >= count:
                raise IndexFileError("an upper-level neighbour id points past the last element")
            need = np.broadcast_to(block_level[:, None], used.shape)[used]
            if (levels[ids.astype(np.int64)] < need).any():
                raise IndexFileError("an upper-level neighbour does not reach that level")
    return HnswFileInfo(count, labels.astype(np.int64), deleted, top)


def config_dir() -> Path:
    """This user's CHAI configuration folder (holds the index key; never inside a store).

    ``CHAI_CONFIG_DIR`` if set; else ``%APPDATA%\\comfyui-chai`` on Windows and
    ``$XDG_CONFIG_HOME/comfyui-chai`` (default ``~/.config/comfyui-chai``) elsewhere.
    """
    if os.environ.get("CHAI_CONFIG_DIR"):
        return Path(os.environ["CHAI_CONFIG_DIR"]).expanduser()
    if sys.platform == "win32" and os.environ.get("APPDATA"):
        return Path(os.environ["APPDATA"]) / "comfyui-chai"
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "comfyui-chai"


class IndexKey:
    """The per-user secret that signs index files this user's stores wrote (HMAC-SHA256).

    Kept in :func:`config_dir` as ``index-key`` (32 random bytes, mode 0600, created on first use).
    A key file that is a link, of another size, owned by another user or readable by others is not
    a secret: it is ignored (with a warning) and every index file goes through the structural check.

    Args:
        secret: the key bytes, or None when no usable key exists (signing then returns None).
    """

    FILE_NAME = "index-key"
    _cache: dict[str, "IndexKey"] = {}

    def __init__(self, secret: bytes | None) -> None:
        self._secret = secret

    @property
    def usable(self) -> bool:
        """True when this key can sign and check files."""
        return self._secret is not None

    @classmethod
    def for_user(cls) -> "IndexKey":
        """This user's key (loaded or created once per process and configuration folder)."""
        folder = config_dir()
        cached = cls._cache.get(str(folder))
        if cached is None:
            cached = cls._cache[str(folder)] = cls(_load_or_create_secret(folder / cls.FILE_NAME))
        return cached

    def sign(self, store_id: str, name: str, fd: int) -> str | None:
        """``hmac-sha256:<hex>`` over (store id, file name, the whole file read through ``fd``), or
        None without a usable key."""
        if self._secret is None:
            return None
        mac = hmac.new(self._secret, f"comfyui-chai index\0{store_id}\0{name}\0".encode(), hashlib.sha256)
        os.lseek(fd, 0, os.SEEK_SET)
        while True:
            block = os.read(fd, 1 << 22)
            if not block:
                break
            mac.update(block)
        return "hmac-sha256:" + mac.hexdigest()

    def verify(self, recorded: str | None, store_id: str, name: str, fd: int) -> bool:
        """True when ``recorded`` is this key's signature of the file behind ``fd``."""
        if self._secret is None or not isinstance(recorded, str) or not recorded.startswith("hmac-sha256:"):
            return False
        return hmac.compare_digest(recorded, self.sign(store_id, name, fd) or "")


def _load_or_create_secret(path: Path) -> bytes | None:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _attempt in range(2):
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            if not _create_secret(path):
                return None
            continue
        except OSError as exc:
            log.warning("CHAI: index key %s cannot be read (%s); index files get the structural check", path, exc)
            return None
        try:
            st = os.fstat(fd)
            data = os.read(fd, 64)
        finally:
            os.close(fd)
        owner_ok = not hasattr(os, "getuid") or st.st_uid == os.getuid()
        private = sys.platform == "win32" or not (st.st_mode & 0o077)
        if stat.S_ISREG(st.st_mode) and owner_ok and private and len(data) == 32:
            return data
        log.warning("CHAI: index key %s is not a private 32-byte file of this user; ignoring it "
                    "(index files get the structural check). Delete it to make a new one.", path)
        return None
    return None


def _create_secret(path: Path) -> bool:
    """Create the key atomically (temp file 0600, then link to the final name). False if impossible."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_BINARY", 0), 0o600)
        try:
            os.write(fd, os.urandom(32))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process created the key first: we then read theirs
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: a rename is atomic too
            if not path.exists():
                os.replace(tmp, path)
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return True
    except OSError as exc:
        log.warning("CHAI: cannot create the index key in %s (%s); index files get the structural check",
                    path.parent, exc)
        return False
