"""Read and write `.safetensors` files with numpy alone (TensorRT-LLM writes its expert statistics
with `safetensors.torch.save_file`; importing them should not need torch or safetensors).

The format (github.com/huggingface/safetensors, README "Format"): 8 bytes little-endian u64 N, then
N bytes of JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, optional
"__metadata__": {str: str}}, then the byte buffer; offsets are relative to the buffer, data is
little-endian and C-ordered.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from vllm_moeplace.profiling.formats.common import TraceImportError

# safetensors dtype name -> numpy dtype (the integer and float types a statistic can have)
DTYPES = {
    "BOOL": "|b1", "U8": "|u1", "I8": "|i1", "I16": "<i2", "U16": "<u2", "I32": "<i4", "U32": "<u4",
    "I64": "<i8", "U64": "<u8", "F16": "<f2", "F32": "<f4", "F64": "<f8",
}
_MAX_HEADER = 100_000_000  # the reference implementation's own header limit


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TraceImportError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) < 8:
        raise TraceImportError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER, len(data) - 8):
        raise TraceImportError(f"{path}: not a safetensors file (header length {n} exceeds the file)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceImportError(f"{path}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise TraceImportError(f"{path}: malformed safetensors header (not a JSON object)")
    buf = memoryview(data)[8 + n :]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(DTYPES[info["dtype"]])
            shape = [int(x) for x in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise TraceImportError(f"{path}: tensor '{name}': unsupported or malformed entry {info!r}") from None
        count = int(np.prod(shape)) if shape else 1
        if not 0 <= begin <= end <= len(buf) or end - begin != count * dtype.itemsize:
            raise TraceImportError(f"{path}: tensor '{name}': data_offsets {[begin, end]} do not fit shape {shape} "
                                   f"{info['dtype']} in a {len(buf)}-byte buffer")
        out[name] = np.frombuffer(buf[begin:end], dtype=dtype).reshape(shape).copy()
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The inverse of `read_safetensors` (used by tests and examples; keys in sorted order, as the
    reference writer does)."""
    names = {np.dtype(v): k for k, v in DTYPES.items()}
    header: dict[str, dict] = {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        raw = a.tobytes()
        header[name] = {"dtype": names[np.dtype(a.dtype)], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the reference writer pads the header to 8 bytes
    Path(path).write_bytes(struct.pack("<Q", len(head)) + head + b"".join(chunks))
