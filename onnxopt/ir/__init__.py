"""The in-memory model: model files (load, save gate, external data), onnx-graphsurgeon graph
helpers, weight staging, pinned input shapes."""
