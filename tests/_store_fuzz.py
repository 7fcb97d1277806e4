"""Mutations and the child process of tests/test_store_fuzz.py (not a test module itself).

Each fuzz case is a copy of a small store in which one file was mutated the way an attacker who
controls the whole folder would: an hnswlib partition file (header fields, link counts, neighbour
ids, levels, labels, sizes, random bytes), a latent file's safetensors header (length, JSON,
dtype, shape, offsets, names), or cells of the manifest (types and values CHAI never writes).
For the first two the attacker also rewrites the manifest so the mutation is not caught by a size
or SHA-256 check alone: the recorded index size, or the entry's size and SHA-256, match the
mutated file.

:func:`fuzz_child` runs in a forked child: it installs an audit hook that records every file the
process touches through Python (open, rename, remove, mkdir, listdir, sqlite3.connect), opens the
store, searches every key, loads every entry it finds, and writes a JSON verdict.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import struct
import sys
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _store_util import KEYS, put_seeded, unit_vectors  # noqa: E402
from comfyui_chai.cache.store_types import StoreError  # noqa: E402

_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
# (name, offset, struct format) of every field of hnswlib's header
_FIELDS = [("offsetLevel0", 0, "<Q"), ("max_elements", 8, "<Q"), ("cur_element_count", 16, "<Q"),
           ("size_data_per_element", 24, "<Q"), ("label_offset", 32, "<Q"), ("offsetData", 40, "<Q"),
           ("maxlevel", 48, "<i"), ("enterpoint_node", 52, "<I"), ("maxM", 56, "<Q"), ("maxM0", 64, "<Q"),
           ("M", 72, "<Q"), ("mult", 80, "<d"), ("ef_construction", 88, "<Q")]


def _interesting(rng: random.Random, fmt: str, current):
    if fmt == "<d":
        return rng.choice([0.0, -1.0, 1e300, float("nan"), float("inf"), current * 10, current / 10])
    bits = {"<Q": 64, "<I": 32, "<i": 32}[fmt]
    lo, hi = (-(1 << 31), (1 << 31) - 1) if fmt == "<i" else (0, (1 << bits) - 1)
    pool = [0, 1, 2, hi, current + 1, current - 1, current * 2, current + 1000, 1 << 20, rng.randint(lo, hi)]
    if fmt == "<i":
        pool += [-1, -2, 64, 100_000]
    return min(max(int(rng.choice(pool)), lo), hi)


def _layout(blob: bytes) -> dict:
    f = _HEADER.unpack_from(blob, 0)
    count, size_data, maxm = f[2], f[3], f[8]
    start = _HEADER.size + count * size_data
    upper = []  # (element, offset of its link lists, bytes)
    pos = start
    for i in range(count):
        (n,) = struct.unpack_from("<I", blob, pos)
        upper.append((i, pos, n))
        pos += 4 + n
    return {"count": count, "size_data": size_data, "maxM": maxm, "maxM0": f[9], "upper": upper}


def upper_offsets(blob: bytes) -> list[int]:
    """Offsets of every element's link-list size field in an hnswlib file (after level 0)."""
    return [off for _i, off, _n in _layout(blob)["upper"]]


def mutate_index(blob: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One to three mutations of an hnswlib partition file; returns (file, description)."""
    data = bytearray(blob)
    done = []
    for _ in range(rng.randint(1, 3)):
        lay = _layout(bytes(blob))  # offsets of the original layout: later ops may hit shifted data
        op = rng.choice(["field", "field", "field", "neighbour", "count0", "linksize", "upper_id", "label",
                         "flip", "truncate", "append", "delete_mark"])
        n, size_data, maxm0 = lay["count"], lay["size_data"], lay["maxM0"]
        if op == "field":
            name, off, fmt = rng.choice(_FIELDS)
            if off + struct.calcsize(fmt) <= len(data):
                cur = struct.unpack_from(fmt, data, off)[0]
                val = _interesting(rng, fmt, cur if fmt == "<d" else int(cur))
                struct.pack_into(fmt, data, off, val)
                done.append(f"{name}={val}")
        elif op in ("neighbour", "count0", "label", "delete_mark") and n:
            i = rng.randrange(n)
            base = _HEADER.size + i * size_data
            if base + size_data > len(data):
                continue
            if op == "neighbour":
                j = rng.randrange(maxm0)
                val = rng.choice([n, n + 1, 0xFFFFFFFF, rng.randrange(1 << 32), rng.randrange(n)])
                struct.pack_into("<I", data, base + 4 + 4 * j, val)
                struct.pack_into("<H", data, base, max(struct.unpack_from("<H", data, base)[0], j + 1))
                done.append(f"neighbour[{i}][{j}]={val}")
            elif op == "count0":
                val = rng.choice([maxm0 + 1, 0xFFFF, rng.randrange(1 << 16)])
                struct.pack_into("<H", data, base, val)
                done.append(f"count0[{i}]={val}")
            elif op == "label":
                label_off = base + size_data - 8
                other = _HEADER.size + rng.randrange(n) * size_data + size_data - 8
                val = rng.choice([0, 1 << 63, (1 << 64) - 1, struct.unpack_from("<Q", data, other)[0]])
                struct.pack_into("<Q", data, label_off, val)
                done.append(f"label[{i}]={val}")
            else:
                data[base + 2] ^= 0x01
                done.append(f"delete_mark[{i}]")
        elif op in ("linksize", "upper_id") and lay["upper"]:
            with_links = [u for u in lay["upper"] if u[2]] or lay["upper"]
            i, off, size = rng.choice(with_links if op == "upper_id" else lay["upper"])
            if off + 4 > len(data):
                continue
            if op == "linksize":
                val = rng.choice([size + 4, size * 2 + (lay["maxM"] * 4 + 4), 1 << 31, 0xFFFFFFFF, rng.randrange(1 << 16)])
                struct.pack_into("<I", data, off, val)
                done.append(f"linksize[{i}]={val}")
            elif size:
                j = rng.randrange(max(1, size // 4 - 1))
                val = rng.choice([n, 0xFFFFFFFF, rng.randrange(n), rng.randrange(1 << 32)])
                if off + 8 + 4 * j <= len(data):
                    struct.pack_into("<I", data, off + 8 + 4 * j, val)
                    struct.pack_into("<H", data, off + 4, max(struct.unpack_from("<H", data, off + 4)[0], j + 1))
                    done.append(f"upper_id[{i}][{j}]={val}")
        elif op == "flip":
            for _ in range(rng.randint(1, 8)):
                k = rng.randrange(len(data))
                data[k] ^= 1 << rng.randrange(8)
            done.append("flip")
        elif op == "truncate":
            cut = rng.randrange(len(data))
            del data[cut:]
            done.append(f"truncate@{cut}")
            if not data:
                break
        elif op == "append":
            data += bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 8, size_data, 97])))
            done.append("append")
    return bytes(data), ",".join(done) or "none"


def mutate_header(blob: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of a safetensors file's header (or of its length or data size)."""
    (hlen,) = struct.unpack_from("<Q", blob, 0)
    header = json.loads(blob[8:8 + hlen])
    body = blob[8 + hlen:]
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    op = rng.choice(["dtype", "shape", "offsets", "offsets", "name", "extra", "drop", "meta", "length", "nested",
                     "bytes", "body", "json_type"])
    desc = f"{op}"
    if op == "dtype":
        header[name]["dtype"] = rng.choice(["F64", "I8", "U8", "BOOL", "F32", "F16", "BF16", "X", 5, None, ["F16"]])
        desc += f":{header[name]['dtype']}"
    elif op == "shape":
        shape = list(header[name]["shape"])
        choice = rng.randrange(7)
        if choice == 0:
            shape[rng.randrange(len(shape))] = rng.choice([-1, 0, 1 << 40, (1 << 63) - 1])
        elif choice == 1:
            shape.append(rng.choice([1, 2, 1000]))
        elif choice == 2:
            shape = shape[:-1]
        elif choice == 3:
            shape[0] = rng.choice([1.5, "4", None, [4]])
        elif choice == 4:
            shape = list(reversed(shape))
        elif choice == 5:
            shape = []
        else:
            shape = "4x3"
        header[name]["shape"] = shape
        desc += f":{shape}"
    elif op == "offsets":
        a, b = header[name]["data_offsets"]
        choice = rng.randrange(6)
        header[name]["data_offsets"] = [
            [b, a], [a, b + rng.randint(1, 64)], [a - rng.randint(1, 64), b], [0, len(body) + 1],
            [a, (1 << 64) - 1], [float(a), b]][choice]
        desc += f":{header[name]['data_offsets']}"
    elif op == "name":
        header[rng.choice(["step_9", "", "__metadata__x", name + "\x00"])] = header.pop(name)
    elif op == "extra":
        header["extra"] = {"dtype": "F16", "shape": [1], "data_offsets": [len(body), len(body) + 2]}
    elif op == "drop" and len(names) > 1:
        header.pop(name)
    elif op == "meta":
        header["__metadata__"] = rng.choice([{"a": 1}, ["x"], "s", {"k": {"n": 1}}, {"compat_key": "other"}])
    elif op == "json_type":
        header = rng.choice([[], "str", 1, None])
    text = json.dumps(header).encode() if op != "bytes" else blob[8:8 + hlen]
    if op == "bytes":
        text = bytearray(text)
        for _ in range(rng.randint(1, 6)):
            text[rng.randrange(len(text))] = rng.randrange(256)
        text = bytes(text)
    if op == "nested":  # JSON nested deeper than any parser's recursion limit
        depth = rng.choice([10_000, 100_000])
        text = text[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}" if rng.random() < 0.5 else b"{" * depth
    if op == "body":
        body = body[: rng.randrange(len(body))] if rng.random() < 0.5 else body + b"\0" * rng.randint(1, 64)
    length = len(text)
    if op == "length":
        length = rng.choice([0, 1, 7, len(text) - 1, len(text) + 1, 1 << 20, (1 << 64) - 1, len(blob)])
        desc += f":{length}"
    return struct.pack("<Q", length) + text + body, desc


# Cells of the manifest an attacker may rewrite, and values CHAI never writes there.
_MANIFEST_COLUMNS = {
    "entries": ["id", "compat_key", "prompt", "nbytes", "sha256", "created_at", "last_access", "access_count", "info"],
    "entities": ["label", "entry_id", "compat_key", "text", "embedding"],
    "partitions": ["compat_key", "tensor_spec", "index_mac", "index_size", "index_generation", "index_deleted"],
    "meta": ["value"], "counters": ["value"], "deleted_labels": ["label", "compat_key", "generation"],
    "lookup_log": ["time", "prompt", "hit", "entity", "matched", "similarity", "ms"], "entity_counts": ["text", "count"],
}
_MANIFEST_VALUES = [None, 0, -1, 1, (1 << 63) - 1, -(1 << 63), 1.5, float("nan"), "", "x", "../../etc/passwd",
                    "/etc/passwd", b"\x00\xff", b"", "[]", "{}", '{"a": [1]}', "null", "1e999", "9" * 30,
                    json.dumps({"step_2": ["float16", [4, 3, 5, 7]]}), json.dumps([1] * 5000)]


def mutate_manifest(store_dir: Path, rng: random.Random) -> str:
    """Rewrite one to three random cells of the manifest with values CHAI never writes."""
    conn = sqlite3.connect(store_dir / "manifest.sqlite")
    done = []
    try:
        for _ in range(rng.randint(1, 3)):
            table = rng.choice(list(_MANIFEST_COLUMNS))
            column = rng.choice(_MANIFEST_COLUMNS[table])
            rows = conn.execute(f"SELECT rowid FROM {table}").fetchall()
            if not rows:
                continue
            rowid, value = rng.choice(rows)[0], rng.choice(_MANIFEST_VALUES)
            try:
                conn.execute(f"UPDATE {table} SET {column}=? WHERE rowid=?", (value, rowid))
                done.append(f"{table}.{column}[{rowid}]={value!r:.24}")
            except sqlite3.Error:
                continue  # a NOT NULL or UNIQUE constraint refused it
        conn.commit()
    finally:
        conn.close()
    return ",".join(done) or "none"


def record_attack(store_dir: Path, kind: str, target: str | int, data: bytes) -> None:
    """Write the mutated file and make the manifest agree with it (what an attacker can do)."""
    import hashlib

    conn = sqlite3.connect(store_dir / "manifest.sqlite")
    try:
        if kind == "index":
            (store_dir / "index" / target).write_bytes(data)
            conn.execute("UPDATE partitions SET index_size=?, index_mac=? WHERE compat_key=?",
                         (len(data), "sha256:" + hashlib.sha256(data).hexdigest(), KEYS[0]))
        else:
            (store_dir / "latents" / f"{target}.safetensors").write_bytes(data)
            conn.execute("UPDATE entries SET nbytes=?, sha256=? WHERE id=?",
                         (len(data), hashlib.sha256(data).hexdigest(), int(target)))
        conn.commit()
    finally:
        conn.close()


def fuzz_child(store_dir: str, verdict_path: str, config_dir: str, target: int | None = None,
               errors_allowed: bool = False) -> None:
    """Open the store, search every key, load what is found and the entry ``target``; write a JSON
    verdict. Exit 0. With ``errors_allowed`` (a crafted manifest) a one-line StoreError or ValueError
    from any call is a clear outcome too, and an insert is tried after the reads.

    ``verdict["outside"]`` lists every path the process touched through Python outside the store,
    the index-key folder and its own code (empty when containment holds)."""
    code = {os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, Path(__file__).parents[1])}
    allowed = (os.path.realpath(store_dir) + os.sep, os.path.realpath(config_dir) + os.sep, "/proc/self/fd/",
               *code)
    touched: list[str] = []

    def hook(event, args):
        if event in ("open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.listdir", "os.scandir",
                     "os.symlink", "os.link", "os.chmod", "os.truncate", "sqlite3.connect", "shutil.rmtree"):
            for arg in args[:2]:
                if isinstance(arg, (str, bytes, os.PathLike)):
                    path = os.fsdecode(arg)
                    if event == "sqlite3.connect" and path.startswith("file:"):
                        from urllib.parse import unquote, urlparse

                        path = unquote(urlparse(path).path)
                    touched.append(path)

    verdict: dict = {"ok": False}
    try:
        from comfyui_chai.cache.store import LatentStore

        sys.addaudithook(hook)
        try:
            store = LatentStore(store_dir)
        except StoreError as exc:
            verdict.update(ok=True, outcome="refused", detail=str(exc))
        else:
            with store:
                served = quarantined = 0
                gone: set[int] = set()  # quarantined by a load below: later matches may still name them
                checked: set[int] = set()
                rng = np.random.default_rng(0)
                for key in KEYS:
                    for m in store.search(unit_vectors(rng, 3), key, k=8):
                        if m.entry_id in gone or m.entry_id in checked:
                            continue
                        checked.add(m.entry_id)
                        rec = store.entry(m.entry_id)
                        assert rec is not None and rec.compat_key == key, "search returned a row that is not there"
                        tensors = store.load(m.entry_id)
                        if tensors is None:
                            quarantined += 1
                            gone.add(m.entry_id)
                            continue
                        spec = json.loads(store._conn().execute(
                            "SELECT tensor_spec FROM partitions WHERE compat_key=?", (key,)).fetchone()[0])
                        got = {k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in tensors.items()}
                        assert got == spec, f"served tensors {got} differ from the key's spec {spec}"
                        served += 1
                if target is not None and target not in gone and store.load(target) is None:
                    quarantined += 1
                if errors_allowed:
                    store.stats()
                    store.verify()
                    put_seeded(store, 424242)
                verdict.update(ok=True, outcome="opened", report=list(store.open_report), served=served,
                               quarantined=quarantined, events=[e["detail"] for e in store.events(20)])
    except BaseException as exc:  # noqa: BLE001 - any other error is a finding the parent reports
        if errors_allowed and isinstance(exc, (StoreError, ValueError)) and "\n" not in str(exc):
            verdict.update(ok=True, outcome="error", detail=str(exc)[:200])
        else:
            verdict.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
    outside = [p for p in touched if os.path.isabs(p) and not (p + os.sep).startswith(allowed)]
    relative = [p for p in touched if not os.path.isabs(p) and (os.sep in p or p in ("..", "."))]
    verdict["outside"] = sorted(set(outside + relative))[:10]
    with open(verdict_path, "w", encoding="utf-8") as f:
        json.dump(verdict, f)
    os._exit(0)


def limit_memory() -> None:
    """Cap this process's address space at what it maps now plus 2 GiB: a crafted size that makes
    it allocate gigabytes raises MemoryError (a finding) instead of exhausting the machine."""
    try:
        import resource

        pages = int(Path("/proc/self/statm").read_text().split()[0])
        limit = pages * os.sysconf("SC_PAGE_SIZE") + (2 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, OSError, ValueError):
        pass


def seeded_rng(case: int) -> random.Random:
    """The random source of one fuzz case (reproducible from its number)."""
    return random.Random(9_000_000 + case)
