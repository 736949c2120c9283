"""Running models: onnxruntime sessions, robust latency measurement, local and Ray executors."""
