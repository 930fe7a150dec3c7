"""Tiny-graph builders shared by the unit tests (models made with onnx.helper, checked on creation)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def vi(name: str, shape, dtype: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def make_model(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def random_feeds(proto: onnx.ModelProto, seed: int = 0, **fixed) -> dict[str, np.ndarray]:
    """Standard-normal feeds for every (fixed-shape) graph input, except those given by name."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in proto.graph.input:
        if i.name in fixed:
            feeds[i.name] = fixed[i.name]
            continue
        tt = i.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        feeds[i.name] = rng.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return feeds


def run_one_pass(model, spec: dict, calib=None):
    """compress(model) with the one pass `spec` (no validation); the pass must report ok and the output pass the
    full checker."""
    import onnxcomp

    res = onnxcomp.compress(model, [spec], calibration_data=calib, progress=False, validate=False)
    rec = res.report.passes[0]
    assert rec.status == "ok", rec.status
    onnx.checker.check_model(res.model, full_check=True)
    return res
