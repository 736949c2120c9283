"""Post-training INT8 quantization (the `quantize` pass), a package of modules named for what they hold:

- `quantizer`: the pass and its options; `phases`: one run over a model, phase by phase,
  on the state of `state.Work`;
- `selection`: which layers (candidates, layers outside the calibrated path, layers already
  int8); `activations`: activation ranges from calibration; `layer_weights`: int8 weights of
  one layer; `latency`: never slower (per-layer and whole-model timing, unfused layers);
  `search` and `sensitivity`: the sensitivity trials and the search for layers to keep float;
  `storage`: int8 weight storage of the layers that compute in float;
- on ModelProtos: `qdq` writes QDQ and int8 storage, `requantize` undoes onnxruntime's dynamic
  MatMulInteger layers, `optimized` reads onnxruntime's optimized graph, `proto_graphs` walks
  graphs and bodies.

The IR boundary: the pass receives a gs.Graph like every pass, but works on a ModelProto,
because its work is building variant models (per-layer timings, sensitivity trials, the
bisection for float layers) that are serialized for onnxruntime anyway and that worker
processes receive as protos. `boundary.to_proto` exports the graph once when the pass starts
and `boundary.write_back` puts the chosen model into the graph once when it ends; those two
functions are the only crossing between the IRs (tests/passes/test_quantize_boundary.py checks that
the round trip is exact).
"""

from onnxopt.passes.quantize.quantizer import Quantize

__all__ = ["Quantize"]
