"""Algorithms the weight passes share: which weight layers a pass sees (select), OBS/SparseGPT math (sparsegpt),
end-to-end sensitivity probes and budget allocation (sensitivity), structured channel groups (channels) and
attention heads (heads). They work on the engine's models and ONNX Runtime; they never import a pass."""
