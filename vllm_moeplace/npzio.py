"""Reading numpy input files (`.npz` archives, `.npy` arrays) that may be anything.

`np.load` trusts the file: a `.npy` named `.npz` comes back as an array, not an archive; a header
may declare a shape of terabytes that is allocated before the data is read; corrupt compressed
data surfaces as zlib or CRC errors from deep inside; object arrays need unpickling. This reader
checks each array's header against the bytes actually stored before allocating, refuses object
(pickled) arrays without unpickling them, and turns every failure into one error naming the file
and the array.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.limits import MAX_NPZ_BYTES

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
# What a broken archive member raises while it is decompressed or its CRC checked.
_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError)


def _check_file(path: Path, what: str, error: type[MoeplaceError]) -> bytes:
    """The first bytes of an existing regular file (for sniffing its real type)."""
    try:
        if path.is_dir():
            raise error(f"{path}: {what} is a folder, expected a file")
        with path.open("rb") as f:
            return f.read(8)
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None


def _what_it_is(head: bytes) -> str:
    if head.startswith(NPY_MAGIC):
        return "a single .npy array"
    if not head:
        return "an empty file"
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON text"
    if head[:1] == b"\x80":
        return "a Python pickle"
    return "unknown content"


def _read_header(f: IO[bytes], src: str, key: str, error: type[MoeplaceError]) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except _CORRUPT as e:
        raise error(f"{src}: key '{key}': not a valid .npy array header ({e})") from None
    if dtype.hasobject:
        raise error(f"{src}: key '{key}': unreadable array (Object arrays cannot be loaded: {dtype} holds pickled "
                    "Python objects, refused and never unpickled)")
    return shape, fortran, dtype


def read_npz(path: str | os.PathLike, what: str, error: type[MoeplaceError]) -> dict[str, np.ndarray]:
    """Every array of an `.npz` archive, checked (see module doc). Raises `error` naming the file
    and, for a bad array, its key."""
    p, src = Path(path), str(path)
    head = _check_file(p, what, error)
    if not head.startswith(ZIP_MAGIC):
        raise error(f"{src}: not a readable .npz {what} ({_what_it_is(head)}, not a zip archive)")
    try:
        zf = zipfile.ZipFile(p)
    except _CORRUPT as e:
        raise error(f"{src}: not a readable .npz {what} ({e})") from None
    out: dict[str, np.ndarray] = {}
    with zf:
        infos = zf.infolist()
        total = sum(i.file_size for i in infos)
        if total > MAX_NPZ_BYTES:
            raise error(f"{src}: {what} unpacks to {total} bytes, more than the {MAX_NPZ_BYTES} this reader accepts")
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise error(f"{src}: archive member '{info.filename}' is not a .npy array")
            key = info.filename[: -len(".npy")]
            try:
                with zf.open(info) as member:
                    # zip members are not seekable: read the header through a buffered view
                    out[key] = _read_member(member, info.file_size, src, key, error)
            except _CORRUPT as e:
                raise error(f"{src}: key '{key}': compressed data is corrupt ({e})") from None
    return out


def _read_member(member: IO[bytes], size: int, src: str, key: str, error: type[MoeplaceError]) -> np.ndarray:
    # The header is at most a few KB: read it into memory so its length is known.
    prefix = member.read(min(size, 1 << 16))
    buf = io.BytesIO(prefix)
    shape, fortran, dtype = _read_header(buf, src, key, error)
    header_len = buf.tell()
    count = 1
    for n in shape:
        count *= int(n)
    nbytes = count * dtype.itemsize
    if nbytes != size - header_len:
        raise error(f"{src}: key '{key}': header declares {dtype} shape {list(shape)} ({nbytes} bytes) but the "
                    f"archive stores {size - header_len} bytes: corrupt or truncated")
    rest = member.read(nbytes - (len(prefix) - header_len))
    member.read(1)  # reach the end of the member, where its CRC is checked
    data = prefix[header_len:] + rest
    if len(data) != nbytes:
        raise error(f"{src}: key '{key}': truncated ({len(data)} of {nbytes} bytes)")
    a = np.frombuffer(bytearray(data), dtype=dtype)  # bytearray: a writable array, like np.load's
    return a.reshape(shape[::-1]).transpose() if fortran else a.reshape(shape)


def read_npy(path: str | os.PathLike, what: str, error: type[MoeplaceError]) -> np.ndarray:
    """One `.npy` array file, checked like an archive member (header vs file size, no pickles)."""
    p, src = Path(path), str(path)
    head = _check_file(p, what, error)
    if not head.startswith(NPY_MAGIC):
        raise error(f"{src}: not a .npy array ({'a zip archive (.npz?)' if head.startswith(ZIP_MAGIC) else _what_it_is(head)})")
    size = p.stat().st_size
    if size > MAX_NPZ_BYTES:
        raise error(f"{src}: {what} is {size} bytes, more than the {MAX_NPZ_BYTES} this reader accepts")
    with p.open("rb") as f:
        return _read_member(f, size, src, p.stem, error)
