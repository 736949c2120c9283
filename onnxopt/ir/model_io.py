"""Model files: loading with clear errors, and (re-exported here) saving, external data.

`load_model` turns every bad input into one `UserError` line. Saving (`onnxopt.ir.save`) is
atomic; external data (`onnxopt.ir.external_data`) is read in, or staged on disk for big models
(`onnxopt.ir.weights`); every optimized model passes the save gate (`onnxopt.verify.gate`) before it is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from onnxopt.errors import UserError
from onnxopt.ir import weights
from onnxopt.ir.external_data import (
    EXTERNAL_THRESHOLD,
    NOT_A_MODEL,
    TWO_GB,
    external_tensors,
    fits_in_protobuf,
    model_files,
    model_nbytes,
    uses_external_data,
    write_external,
)
from onnxopt.ir.save import check_data_beside, check_output_path, data_file_of, save_model
from onnxopt.ir.structure import structure_only

__all__ = [
    "EXTERNAL_THRESHOLD",
    "TWO_GB",
    "check_data_beside",
    "check_output_path",
    "data_file_of",
    "fits_in_protobuf",
    "load_model",
    "model_files",
    "model_nbytes",
    "save_model",
    "structure_only",
    "uses_external_data",
    "write_external",
]


def load_model(path: str | os.PathLike, load_external: bool = True) -> onnx.ModelProto:
    """Read an ONNX model, raising `UserError` with one clear line for any bad input."""
    p = Path(path)
    _check_model_file(p)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except NOT_A_MODEL as exc:
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


def _check_model_file(p: Path) -> None:
    """Refuse a path that is missing, a directory or an empty file."""
    if not p.exists():
        raise UserError(f"{p}: no such file (give the path of an .onnx model)")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, not an .onnx model file")
    if p.stat().st_size == 0:
        raise UserError(f"{p}: empty file, not an ONNX model")


def _attach_external_data(model: onnx.ModelProto, p: Path) -> None:
    """Check the model's external data files, then read them in, or stage them when they are big.

    Above `weights.MAP_EXTERNAL_BYTES` the weights stay on disk (memory-mapped on
    use, see `onnxopt.ir.weights`), so a model of any size is never held whole in memory.
    Only main-graph initializers are staged; a model keeping Constant-node or
    subgraph data externally is read in.
    """
    base = p.resolve().parent
    tensors = external_tensors(model)
    locations, total = _check_external_files(tensors, p, base)
    initializers = {id(t) for t in model.graph.initializer}
    if total >= weights.MAP_EXTERNAL_BYTES and all(id(t) in initializers for t in tensors):
        staged = {loc: weights.stage_file(base / loc) for loc in locations}
        for t in tensors:
            loc, offset, _ = weights.external_info(t)
            weights.set_external(t, staged[loc], offset, weights.external_nbytes(t))
        return
    try:
        onnx.load_external_data_for_model(model, str(base))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:  # unreadable data file
        raise UserError(f"{p}: cannot read external data ({exc})") from None


def _check_external_files(tensors: list[onnx.TensorProto], p: Path, base: Path) -> tuple[list[str], int]:
    """Check that every external tensor's file exists beside the model and holds its bytes; return
    the data files (in first-use order) and the total bytes of the tensors."""
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
            raise UserError(
                f"{p}: external data file '{loc}' is truncated: tensor '{t.name}' needs bytes "
                f"{offset}..{offset + n}, the file has {size}"
            )
        total += n
    return list(sizes), total
