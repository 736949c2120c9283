"""External data: which files a model refers to, its size, and writing its weights beside it.

`write_external` writes a model with its large tensors in a data file without copying the
model (weights staged on disk go file to file, `onnxopt.ir.weights`); `session_model` uses it
to hand onnxruntime a model whose staged weights it maps itself.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import numpy_helper

from onnxopt.ir import weights

TWO_GB = 2**31
#: Tensors at least this large go to the external data file when one is written.
EXTERNAL_THRESHOLD = 1024
#: What reading a file that is not an ONNX model raises (protobuf parse failures).
NOT_A_MODEL = (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError)

_MODEL_FIELDS = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")
_GRAPH_FIELDS = ("node", "input", "output", "value_info", "sparse_initializer", "quantization_annotation")
_session_ids = itertools.count()


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor of the model (subgraphs and attributes included) whose data lives in a file."""
    return [t for t in weights.all_tensors(model) if weights.is_external(t)]


def uses_external_data(model: onnx.ModelProto) -> bool:
    """True if any tensor of the model lives in an external file."""
    return bool(external_tensors(model))


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    """True if the model serializes as one protobuf (< 2 GB); ByteSize() itself raises above that."""
    try:
        return model.ByteSize() < TWO_GB
    except EncodeError:
        return False


def model_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of all tensor data (in memory or staged on disk), without serializing the model."""
    return sum(
        weights.external_nbytes(t) if weights.is_external(t) else len(t.raw_data) for t in weights.all_tensors(model)
    )


def model_files(path: str | os.PathLike) -> set[Path]:
    """The resolved paths of a model file and of every external data file it refers to.

    These are the files an output must never overwrite. Only the protobuf is parsed
    (no weight is read); a file that is not a model counts as itself alone.
    """
    p = Path(path).resolve()
    if not p.is_file():
        return {p}
    st = p.stat()
    return {p} | set(_external_files(str(p), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=64)
def _external_files(path: str, mtime_ns: int, size: int) -> tuple[Path, ...]:
    """External data files of the model at `path` (cached per file version: the CLI, the API and
    optimize-many ask about the same input several times, and parsing a big model is not free)."""
    p = Path(path)
    try:
        model = onnx.load(path, load_external_data=False)
    except (*NOT_A_MODEL, OSError):  # not a model: load_model reports it; here it is one file to protect
        return ()
    locs = {weights.external_info(t)[0] for t in external_tensors(model)}
    return tuple(sorted((p.parent / loc).resolve() for loc in locs if loc))


def write_external(
    model: onnx.ModelProto, model_path: Path, data_path: Path, location: str, copy_staged: bool = True
) -> None:
    """Write `model` with its large tensors in `data_path`, without changing or copying `model`.

    A weight-free skeleton of the model is built field by field; each large
    in-memory tensor's bytes go straight to the data file (one tensor at a time),
    and staged tensors (`onnxopt.ir.weights`) are copied file to file, or with
    `copy_staged=False` left pointing at the staging directory (session models
    written there). Tensors start at page boundaries, so the file can be mapped.
    """
    skeleton = _skeleton(model)
    g = skeleton.graph
    with open(data_path, "wb") as data:
        for t in model.graph.initializer:
            placed = _write_tensor_data(t, data, copy_staged)
            if placed is None:
                g.initializer.append(t)
                continue
            ext = g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims, doc_string=t.doc_string)
            weights.set_external(ext, location, *placed)
    with open(model_path, "wb") as f:
        f.write(skeleton.SerializeToString(deterministic=True))


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` without its main graph's initializers, built field by field (no weight is copied)."""
    skeleton = onnx.ModelProto()
    for f in _MODEL_FIELDS:
        setattr(skeleton, f, getattr(model, f))
    skeleton.opset_import.extend(model.opset_import)
    skeleton.metadata_props.extend(model.metadata_props)
    skeleton.functions.extend(model.functions)
    src, g = model.graph, skeleton.graph
    g.name, g.doc_string = src.name, src.doc_string
    for f in _GRAPH_FIELDS:
        getattr(g, f).extend(getattr(src, f))
    return skeleton


def _write_tensor_data(t: onnx.TensorProto, data: BinaryIO, copy_staged: bool) -> tuple[int, int] | None:
    """Append initializer `t`'s bytes to `data` at a page boundary and return (offset, length); None
    for a tensor that stays in the protobuf (small, strings, or staged with `copy_staged=False`)."""
    if weights.is_external(t):
        if not copy_staged:
            return None
        return weights.copy_range(t, data), weights.external_nbytes(t)
    raw = t.raw_data if t.HasField("raw_data") else None
    if raw is None and t.data_type != onnx.TensorProto.STRING:
        raw = numpy_helper.to_array(t).tobytes() if math.prod(t.dims) * 4 >= EXTERNAL_THRESHOLD else None
    if raw is None or len(raw) < EXTERNAL_THRESHOLD:
        return None
    offset = weights.pad_to_page(data)
    data.write(raw)
    return offset, len(raw)


def session_model(model: onnx.ModelProto) -> Path:
    """Write `model` into the staging directory for onnxruntime: staged tensors stay where they are,
    in-memory tensors of at least 1 KB go to a data file of their own beside it. The caller removes
    both (`remove_session_model`) once the session is built."""
    d = weights.stage_dir()
    k = next(_session_ids)
    path = d / f"session-{k}.onnx"
    write_external(model, path, d / f"session-{k}.data", f"session-{k}.data", copy_staged=False)
    return path


def remove_session_model(path: Path) -> None:
    """Delete a model file written by `session_model` and its data file (mapped data stays valid)."""
    for p in (path, path.with_suffix(".data")):
        p.unlink(missing_ok=True)
