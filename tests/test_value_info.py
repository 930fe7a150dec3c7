"""No pass leaves stale value_info: on fixtures whose source carries a value_info for every tensor, every shape the
compressed model still declares agrees with ONNX shape inference of that model without them (a stale shape after
pruning makes ORT fail with 'Shape mismatch attempting to re-use buffer')."""
import numpy as np
import onnx
import pytest
from onnx import shape_inference

import onnxcomp
from onnxcomp import testing

RECIPES = {
    "channel": [{"type": "sparsify", "pattern": "channel", "sparsity": 0.5}],
    "channel+static": [{"type": "sparsify", "pattern": "channel", "sparsity": 0.5}, {"type": "quantize", "mode": "static"}],
    "lowrank": [{"type": "lowrank", "params_ratio": 0.5, "speed_check": False}],  # factors on every machine
    "static": [{"type": "quantize", "mode": "static"}],
    "2:4": [{"type": "sparsify", "pattern": "2:4"}],
}


def _dims(vi):
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _stale(model: onnx.ModelProto) -> list:
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    inferred = {v.name: _dims(v) for v in shape_inference.infer_shapes(bare).graph.value_info}
    out = []
    for v in model.graph.value_info:
        a, b = _dims(v), inferred.get(v.name)
        if a is not None and b is not None and (len(a) != len(b) or any(
                x is not None and y is not None and x != y for x, y in zip(a, b))):
            out.append((v.name, a, b))
    return out


@pytest.mark.parametrize("kind", ["digits_cnn", "digits_mlp"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_no_stale_value_info(kind, recipe):
    d = testing.digits_data()
    x = d["x_calib"] if kind == "digits_cnn" else d["x_calib_flat"]
    path = testing.digits_cnn_path() if kind == "digits_cnn" else testing.digits_mlp_path()
    src = shape_inference.infer_shapes(onnx.load(str(path)))
    assert len(src.graph.value_info) >= 4  # the source declares its intermediate shapes
    feeds = [{"input": x[i:i + 20]} for i in range(0, 200, 20)]
    res = onnxcomp.compress(src, RECIPES[recipe], calibration_data=feeds, progress=False, validate=False)
    assert not _stale(res.model)
    sess = testing.session(res.model)
    big = np.concatenate([f["input"] for f in feeds])  # another batch size than calibration's: shapes must hold
    assert sess.run(None, {"input": big})[0].shape == (200, 10)
