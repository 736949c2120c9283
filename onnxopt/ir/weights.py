"""Big weights kept on disk: a staging directory, memory-mapped values, spilled new weights.

A model whose external data is large (`MAP_EXTERNAL_BYTES`) is not read into
memory. `model_io.load_model` copies each of its data files into this
process's staging directory (file to file: disk and page cache, not process
memory) and points the tensors there, by a location relative to that
directory. From then on:

- values are read through a copy-on-write `np.memmap` (`mapped`): only the
  pages a pass touches become resident, and the input file is never written;
- a large weight a pass computes is written ("spilled") to a file in the same
  directory at export (`spill`) instead of into the protobuf, where upb would
  copy its bytes on every read and write;
- onnxruntime sessions load a model file written into the directory
  (`external_data.session_model`): onnxruntime maps page-aligned external data itself and
  rejects locations that leave the model's directory (absolute paths and
  symlinks included), which is why data files are staged, not referenced;
- saving copies byte ranges from file to file (`copy_range`).

So a pipeline holds in memory only the weights it rewrites, whatever the
model's size. The directory is removed when the process exits.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import _get_all_tensors  # onnx's own walk over every tensor of a model

#: Models whose external data totals at least this many bytes are memory-mapped, not loaded.
MAP_EXTERNAL_BYTES = 1 << 30
#: New weights at least this large are spilled to disk when the model is memory-mapped.
SPILL_BYTES = 1 << 24
#: The staging directory's file for spilled weights (appended to, page-aligned).
SPILL_FILE = "spill.data"
#: External data is written at multiples of this, so onnxruntime and numpy can map it.
ALIGN = 4096

_lock = threading.Lock()
_state: dict = {"dir": None, "pid": None, "staged": {}}
_spilled: dict[int, tuple[weakref.ref, onnx.TensorProto]] = {}


def stage_dir() -> Path:
    """This process's staging directory (created on first use under $ONNXOPT_STAGE_DIR or the temp dir)."""
    with _lock:
        if _state["dir"] is None or _state["pid"] != os.getpid():
            base = os.environ.get("ONNXOPT_STAGE_DIR") or None
            _state.update(dir=Path(tempfile.mkdtemp(prefix="onnxopt-stage-", dir=base)), pid=os.getpid(), staged={})
            atexit.register(_remove_stage, _state["dir"], os.getpid())
        return _state["dir"]


def _remove_stage(path: Path, pid: int) -> None:
    if os.getpid() == pid:  # forked workers share the directory; only its creator removes it
        shutil.rmtree(path, ignore_errors=True)


def stage_file(path: Path) -> str:
    """Copy the data file `path` into the staging directory (once per process); return its name there.

    A copy, not a link: onnxruntime refuses symlinks that leave the model's
    directory, and onnx refuses to read a data file with several hard links (a
    leftover link would make the user's input unreadable to onnx). The name is
    derived from the file's identity (path, size, mtime), so models staged in
    different processes serialize alike (stable content hashes).
    """
    real = Path(os.path.realpath(path))
    st = real.stat()
    d = stage_dir()
    with _lock:
        name = _state["staged"].get(str(real))
        if name is not None:
            return name
        name = hashlib.sha1(f"{real}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20] + ".data"
        target = d / name
        if not target.exists():
            partial = d / (name + ".partial")
            shutil.copyfile(real, partial)  # in-kernel copy; the page cache holds it, not this process
            os.replace(partial, target)
        _state["staged"][str(real)] = name
        return name


def is_external(t: onnx.TensorProto) -> bool:
    """True for a tensor whose data lives in a file (in memory: a staged file)."""
    return t.data_location == onnx.TensorProto.EXTERNAL


def all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor of the model: initializers and tensor attributes, subgraphs included."""
    return list(_get_all_tensors(model))


def has_external(model: onnx.ModelProto) -> bool:
    """True if any tensor of the model (subgraphs included) keeps its data in a file."""
    return any(is_external(t) for t in _get_all_tensors(model))


def external_info(t: onnx.TensorProto) -> tuple[str, int, int | None]:
    """(location, offset, length or None) of an external tensor."""
    info = {e.key: e.value for e in t.external_data}
    length = info.get("length")
    return info.get("location", ""), int(info.get("offset", 0) or 0), int(length) if length else None


def external_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of an external tensor's data (from its length entry, else its dims and type)."""
    _, _, length = external_info(t)
    if length is not None:
        return length
    n = int(np.prod(t.dims)) if t.dims else 1
    return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


#: Tensor types whose stored bytes are numpy's layout of that dtype (little-endian), so they can be mapped.
_PLAIN = {
    getattr(onnx.TensorProto, k): np.dtype(v)
    for k, v in (
        ("FLOAT", "<f4"),
        ("DOUBLE", "<f8"),
        ("FLOAT16", "<f2"),
        ("INT8", "i1"),
        ("UINT8", "u1"),
        ("INT16", "<i2"),
        ("UINT16", "<u2"),
        ("INT32", "<i4"),
        ("UINT32", "<u4"),
        ("INT64", "<i8"),
        ("UINT64", "<u8"),
        ("BOOL", "?"),
    )
}


def mapped(t: onnx.TensorProto) -> np.ndarray:
    """The values of a staged external tensor: a copy-on-write memory map where numpy has the type,
    else read into a temporary tensor (types numpy stores differently, e.g. bfloat16, int4)."""
    location, offset, length = external_info(t)
    path = stage_dir() / location
    shape = tuple(t.dims)
    count = int(np.prod(shape)) if shape else 1
    if t.data_type in _PLAIN and count and (length is None or length == count * np.dtype(_PLAIN[t.data_type]).itemsize):
        dtype = _PLAIN[t.data_type]
        return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)
    tmp = onnx.TensorProto()
    tmp.CopyFrom(t)
    del tmp.external_data[:]
    tmp.data_location = onnx.TensorProto.DEFAULT
    with open(path, "rb") as f:
        f.seek(offset)
        tmp.raw_data = f.read(length) if length is not None else f.read()
    return numpy_helper.to_array(tmp)


def tensor_values(t: onnx.TensorProto) -> np.ndarray:
    """Numpy values of any tensor of a loaded model (memory-mapped when staged)."""
    return mapped(t) if is_external(t) else numpy_helper.to_array(t)


def set_external(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Point `t` at `length` bytes of `location` from `offset` (its in-memory data is dropped)."""
    del t.external_data[:]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=value)


def pad_to_page(f) -> int:
    """Pad an open binary file to the next `ALIGN` boundary; return the new offset."""
    offset = f.tell()
    pad = (-offset) % ALIGN
    if pad:
        f.write(b"\0" * pad)
    return offset + pad


def spill(arr: np.ndarray, proto: onnx.TensorProto) -> None:
    """Write `arr` to the staging directory's spill file and make `proto` (name already set) refer to it."""
    arr = np.ascontiguousarray(arr)
    d = stage_dir()
    with _lock:
        with open(d / SPILL_FILE, "ab") as f:
            offset = pad_to_page(f)
            # numpy's stubs give ndarray `__buffer__` only for Python >= 3.12; it is a buffer on every version
            f.write(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")  # type: ignore[arg-type]
    proto.data_type = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
    del proto.dims[:]
    proto.dims.extend(arr.shape)
    set_external(proto, SPILL_FILE, offset, arr.nbytes)


def spill_once(arr: np.ndarray, name: str) -> onnx.TensorProto:
    """A tensor named `name` referring to `arr` spilled to disk; an array spilled before (and still
    alive) is not written again, so models built repeatedly from the same arrays share the bytes."""
    hit = _spilled.get(id(arr))
    if hit is None or hit[0]() is not arr:
        proto = onnx.TensorProto()
        spill(arr, proto)
        hit = _spilled[id(arr)] = (weakref.ref(arr), proto)
    t = onnx.TensorProto()
    t.CopyFrom(hit[1])
    t.name = name
    return t


def park(arr: np.ndarray) -> np.ndarray:
    """`arr` spilled to disk and memory-mapped back: the same values, but resident only while read
    (a big model's int8 weights, kept for many trial models, would otherwise stay in memory).
    `spill_once` of the returned array refers to the bytes already written."""
    proto = onnx.TensorProto()
    spill(arr, proto)
    view = mapped(proto)
    _spilled[id(view)] = (weakref.ref(view), proto)
    return view


def copy_range(t: onnx.TensorProto, dst) -> int:
    """Append a staged external tensor's bytes to the open file `dst` at a page boundary, file to
    file (the page cache carries them, not this process); return the offset written at."""
    location, offset, length = external_info(t)
    start = pad_to_page(dst)
    dst.flush()
    with open(stage_dir() / location, "rb") as src:
        src.seek(offset)
        remaining = length if length is not None else os.fstat(src.fileno()).st_size - offset
        out_fd, in_fd = dst.fileno(), src.fileno()
        pos = offset
        while remaining > 0:
            try:
                n = os.copy_file_range(in_fd, out_fd, min(remaining, 1 << 30), pos)
            except OSError:  # file systems without copy_file_range: plain chunks
                src.seek(pos)
                chunk = src.read(min(remaining, 1 << 26))
                n = os.write(out_fd, chunk)
            if n <= 0:
                raise OSError(f"external data of '{t.name}' ends early")
            pos += n
            remaining -= n
    dst.seek(0, os.SEEK_END)
    return start
