"""Loading and saving models: validation of input files, external data, atomic writes.

Saving goes to a temporary name in the destination directory and is renamed into
place, so a failure never leaves a half-written model and the input is never touched.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError

from onnxopt import weights
from onnxopt.errors import UserError

TWO_GB = 2**31
#: Tensors at least this large go to the external data file when one is written.
EXTERNAL_THRESHOLD = 1024


def load_model(path: str | os.PathLike, load_external: bool = True) -> onnx.ModelProto:
    """Read an ONNX model, raising `UserError` with one clear line for any bad input."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file (give the path of an .onnx model)")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, not an .onnx model file")
    if p.stat().st_size == 0:
        raise UserError(f"{p}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: not an ONNX model (protobuf parse failed: {str(exc).splitlines()[0][:120]})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise UserError(f"{p}: parses as protobuf but holds no ONNX graph (is it really a model?)")
    if not model.opset_import:
        raise UserError(f"{p}: model declares no opset_import; re-export it with an opset")
    if load_external and uses_external_data(model):
        _attach_external_data(model, p)
    try:
        onnx.checker.check_model(structure_only(model))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"{p}: not a valid ONNX model: {first}") from None
    return model


def _attach_external_data(model: onnx.ModelProto, p: Path) -> None:
    """Check the model's external data files, then read them in, or stage them when they are big.

    Above `weights.MAP_EXTERNAL_BYTES` the weights stay on disk (memory-mapped on
    use, see `onnxopt.weights`), so a model of any size is never held whole in memory.
    Only main-graph initializers are staged; a model keeping Constant-node or
    subgraph data externally is read in.
    """
    base = p.resolve().parent
    tensors = _external_tensors(model)
    sizes: dict[str, int] = {}
    total = 0
    for t in tensors:
        loc, offset, _ = weights.external_info(t)
        f = base / loc
        if not loc or not f.is_file():
            raise UserError(f"{p}: external data file '{loc}' for tensor '{t.name}' is missing next to the model")
        size = sizes.setdefault(loc, f.stat().st_size)
        n = weights.external_nbytes(t)
        if offset + n > size:
            raise UserError(f"{p}: external data file '{loc}' is truncated: tensor '{t.name}' needs bytes "
                            f"{offset}..{offset + n}, the file has {size}")
        total += n
    initializers = {id(t) for t in model.graph.initializer}
    if total >= weights.MAP_EXTERNAL_BYTES and all(id(t) in initializers for t in tensors):
        staged = {loc: weights.stage_file(base / loc) for loc in sizes}
        for t in tensors:
            loc, offset, _ = weights.external_info(t)
            weights.set_external(t, staged[loc], offset, weights.external_nbytes(t))
        return
    try:
        onnx.load_external_data_for_model(model, str(base))
    except Exception as exc:  # unreadable data file
        raise UserError(f"{p}: cannot read external data ({exc})") from None


def structure_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large initializers as typed inputs: what `onnx.checker` needs, no weight copy.

    The checker serializes the model and parses it again in C++; on the full model
    that would hold the weights two more times (and fail above 2 GB).
    """
    from onnxopt.shapes import light_copy

    return light_copy(model)


def _external_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return [t for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]


def uses_external_data(model: onnx.ModelProto) -> bool:
    """True if any tensor of the model lives in an external file."""
    return bool(_external_tensors(model))


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    """True if the model serializes as one protobuf (< 2 GB); ByteSize() itself raises above that."""
    try:
        return model.ByteSize() < TWO_GB
    except EncodeError:
        return False


def model_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of all tensor data (in memory or staged on disk), without serializing the model."""
    from onnx.external_data_helper import _get_all_tensors

    return sum(weights.external_nbytes(t) if weights.is_external(t) else len(t.raw_data)
               for t in _get_all_tensors(model))


def check_output_path(out: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Validate an output path before any work is done, so errors come first and cheaply."""
    o = Path(out)
    for i in inputs:
        if Path(i).exists() and o.exists() and o.resolve() == Path(i).resolve():
            raise UserError(f"{o}: output path equals the input path; the input is never overwritten, choose another -o")
    parent = o.resolve().parent
    if not parent.is_dir():
        raise UserError(f"{o}: output directory {parent} does not exist")
    if o.is_dir():
        raise UserError(f"{o}: is a directory; give a file name for the output model")
    try:  # os.access says yes to root even where nothing can be created (/proc, read-only mounts): try it
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise UserError(f"{o}: output directory {parent} is not writable ({exc.strerror or exc})") from None
    return o


_MODEL_FIELDS = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")
_GRAPH_FIELDS = ("node", "input", "output", "value_info", "sparse_initializer", "quantization_annotation")


def write_external(model: onnx.ModelProto, model_path: Path, data_path: Path, location: str,
                   copy_staged: bool = True) -> None:
    """Write `model` with its large tensors in `data_path`, without changing or copying `model`.

    A weight-free skeleton of the model is built field by field; each large
    in-memory tensor's bytes go straight to the data file (one tensor at a time),
    and staged tensors (`onnxopt.weights`) are copied file to file, or with
    `copy_staged=False` left pointing at the staging directory (session models
    written there). Tensors start at page boundaries, so the file can be mapped.
    """
    from onnx import numpy_helper

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
    with open(data_path, "wb") as data:
        for t in src.initializer:
            if weights.is_external(t):
                if not copy_staged:
                    g.initializer.append(t)
                    continue
                offset, length = weights.copy_range(t, data), weights.external_nbytes(t)
            else:
                raw = t.raw_data if t.HasField("raw_data") else None
                if raw is None and t.data_type != onnx.TensorProto.STRING:
                    raw = numpy_helper.to_array(t).tobytes() if _tensor_elems(t) * 4 >= EXTERNAL_THRESHOLD else None
                if raw is None or len(raw) < EXTERNAL_THRESHOLD:
                    g.initializer.append(t)
                    continue
                offset, length = weights.pad_to_page(data), len(raw)
                data.write(raw)
                del raw
            ext = g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims, doc_string=t.doc_string)
            weights.set_external(ext, location, offset, length)
    with open(model_path, "wb") as f:
        f.write(skeleton.SerializeToString(deterministic=True))


def _tensor_elems(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write `model` atomically; external data when asked, when the model exceeds 2 GB, or when its
    weights are staged on disk (big models, `onnxopt.weights`).

    The external data file is named `<model file name>.data` beside the model.
    """
    out = check_output_path(path)
    if weights.has_external(model):  # staged weights (onnxopt.weights) go file to file, never back into memory
        external_data = True
    elif external_data is None:
        external_data = model_nbytes(model) >= TWO_GB - 2**26
    parent = out.resolve().parent
    tmpdir = Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=parent))
    try:
        tmp_model = tmpdir / out.name
        data_name = out.name + ".data"
        if external_data:
            write_external(model, tmp_model, tmpdir / data_name, data_name)
            os.replace(tmpdir / data_name, parent / data_name)
        else:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString(deterministic=True))
        os.replace(tmp_model, out)
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()
    return out
