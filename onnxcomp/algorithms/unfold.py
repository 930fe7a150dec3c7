"""im2col as a Conv: the exact second moment of a Conv layer's input patches, collected by the same streaming
calibration as any tensor's (sparsify's SparseGPT and quantize's GPTQ round Conv weights against it)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

__all__ = ["unfold_conv", "with_patches"]


def unfold_conv(x: str, weight_shape: Sequence[int], attrs: Mapping[str, Any], name: str
                ) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    """A Conv with one-hot kernels whose output channels are the im2col patches of a Conv reading `x` with a
    weight of `weight_shape` [O, I/group, k...] and the layer's strides/pads/dilations/group: channel c*taps + t
    is input channel c at kernel tap t, the order of W.reshape(O, -1) when group is 1. Its Gram over axis 1 is
    the exact E[patch patch^T] of the layer's input. Output name `name`."""
    cin = int(weight_shape[1]) * int(attrs.get("group", 1))
    kshape = tuple(int(k) for k in weight_shape[2:])
    taps = int(np.prod(kshape))
    eye = np.zeros((cin * taps, cin, taps), np.float32)
    for c in range(cin):
        eye[c * taps + np.arange(taps), c, np.arange(taps)] = 1.0
    kernel = onnx.numpy_helper.from_array(eye.reshape((cin * taps, cin) + kshape), name + "::kernel")
    keep = {k: v for k, v in attrs.items() if k in ("strides", "pads", "dilations", "auto_pad")}
    node = onnx.helper.make_node("Conv", [x, kernel.name], [name], name=name, **keep)
    return node, kernel


def with_patches(model: onnx.ModelProto, convs: Mapping[str, tuple[str, Sequence[int], Mapping[str, Any]]],
                 weights: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A measurement copy of `model` (never the model itself) that also computes, for each `convs` entry
    name -> (input, weight shape, Conv attributes), that Conv's im2col patches under `name` (`unfold_conv`), with
    the initializers named in `weights` replaced by those values (a model whose earlier layers are already
    pruned)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for t in probe.graph.initializer if weights else ():
        if t.name in weights:
            t.CopyFrom(onnx.numpy_helper.from_array(np.asarray(weights[t.name]), t.name))
    for name, (x, shape, attrs) in convs.items():
        node, kernel = unfold_conv(x, shape, attrs, name)
        probe.graph.node.append(node)
        probe.graph.initializer.append(kernel)
    return probe
