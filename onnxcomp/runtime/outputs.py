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
    _add_outputs(aug.graph, outputs, casts)
    return aug


def _add_outputs(graph: onnx.GraphProto, outputs: Sequence[str], casts: Sequence[str]) -> None:
    existing = {o.name for o in graph.output}
    for name in outputs:
        if name not in existing and name not in casts:
            graph.output.add().name = name
    for name in casts:
        out = name + CAST_SUFFIX
        graph.node.append(onnx.helper.make_node("Cast", [name], [out], name=out, to=onnx.TensorProto.FLOAT))
        graph.output.add().name = out


def session_with_outputs(model: onnx.ModelProto, outputs: Sequence[str], casts: Sequence[str] = (),
                         providers=None, name: str = "model"):
    """`make_session(with_outputs(model, outputs, casts), providers, name=name)`. Over 2 GB the outputs are added
    to `model` itself while the session is made (the model is written to a temporary file part by part), then
    removed: a copy would hold the model twice; and the session does not prepack its weights (these sessions
    measure values, never time, and prepacking holds each weight twice while it runs)."""
    from ..ir import is_big
    from .session import make_session

    if not is_big(model):
        return make_session(with_outputs(model, outputs, casts), providers, name=name)
    n_out, n_nodes = len(model.graph.output), len(model.graph.node)
    try:
        _add_outputs(model.graph, outputs, casts)
        return make_session(model, providers, name=name, prepack=False)
    finally:
        del model.graph.output[n_out:]
        del model.graph.node[n_nodes:]


def observable_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors of the main graph ORT can return: graph inputs and node outputs."""
    names = {i.name for i in model.graph.input}
    for n in model.graph.node:
        names.update(n.output)
    return names
