"""Graphs that also output intermediate tensors, for calibration, per-layer comparison and probes."""
from __future__ import annotations

from collections.abc import Sequence

import onnx

#: suffix of the float32 Cast added for a bfloat16 tensor (ORT cannot hand bfloat16 to numpy)
CAST_SUFFIX = "::onnxcomp_calib_f32"


def with_outputs(model: onnx.ModelProto, outputs: Sequence[str], casts: Sequence[str] = ()) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``outputs`` (untyped: ORT infers the types at load), plus
    a float32 Cast of each name in ``casts`` (bfloat16 tensors, which ORT cannot hand to numpy)."""
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    existing = {o.name for o in aug.graph.output}
    for name in outputs:
        if name not in existing and name not in casts:
            aug.graph.output.add().name = name
    for name in casts:
        out = name + CAST_SUFFIX
        aug.graph.node.append(
            onnx.helper.make_node("Cast", [name], [out], name=out, to=onnx.TensorProto.FLOAT)
        )
        aug.graph.output.add().name = out
    return aug


def observable_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors of the main graph ORT can return: graph inputs and node outputs."""
    names = {i.name for i in model.graph.input}
    for n in model.graph.node:
        names.update(n.output)
    return names
