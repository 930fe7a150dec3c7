"""Model summary for `onnxcomp inspect` and reports: ops, parameters and bytes by op type, opsets, I/O."""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx

from . import ir


def _dims(vi: onnx.ValueInfoProto) -> list[Any]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def _op_name(n: onnx.NodeProto) -> str:
    """The op as the summary names it: 'domain.Op' outside the default domain."""
    return f"{n.domain + '.' if n.domain else ''}{n.op_type}"


def _numel(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) if len(t.dims) else 1


def _nbytes(t: onnx.TensorProto) -> int:
    if t.HasField("raw_data") or t.data_location == onnx.TensorProto.EXTERNAL:
        if t.raw_data:
            return len(t.raw_data)
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (_numel(t) + 1) // 2
    return _numel(t) * itemsize


_FLOAT_NAMES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
                onnx.TensorProto.DOUBLE: "fp64"}
#: ops whose weights (and zero points) are n-bit values packed in uint8 (attribute `bits`, default 4: two a byte)
_PACKED4 = {"com.microsoft.MatMulNBits", "com.microsoft.GatherBlockQuantized"}


def _packed_bits(graph: onnx.GraphProto) -> dict[str, int]:
    """Bits per value of the packed inputs (weights, zero points) of each MatMulNBits / GatherBlockQuantized."""
    out = {}
    for n in graph.node:
        if _op_name(n) in _PACKED4:
            bits = next((a.i for a in n.attribute if a.name == "bits"), 4)
            out.update((i, bits) for i in n.input if i)
    return out


#: name endings of the constants a palettized weight is stored and decoded from (passes/palettize.py names them
#: so): packed indices, codebook values, group offsets, scales, and the decode's small shapes and shifts
CODEBOOK_SUFFIXES = tuple(f"_palette_{part}" for part in (
    "indices", "codebook", "group_offsets", "scales", "shape", "shifts", "modulus", "flat", "start", "end",
    "scaled_shape", "scales_start", "scales_end", "scales_axis"))


def _storage(t: onnx.TensorProto, consumer: str, packed_bits: int = 4) -> str:
    """How a weight is stored, as a user reads it: fp32 / fp16 / int8 / int4 / codebook (palettized: indices,
    values, scales) / other (indices, shapes). `packed_bits`: the bits of a packed MatMulNBits-style input."""
    if t.name.endswith(CODEBOOK_SUFFIXES):
        return "codebook"
    if t.data_type in _FLOAT_NAMES:
        return _FLOAT_NAMES[t.data_type]
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or (
            consumer in _PACKED4 and t.data_type == onnx.TensorProto.UINT8 and packed_bits == 4):
        return "int4"
    if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
        return "int8"
    return "other"  # int64/int32 indices and shapes, bools


def summarize(model: onnx.ModelProto) -> dict[str, Any]:
    """JSON-safe summary: op histogram, params/bytes by consuming op type, opsets, inputs/outputs, sizes."""
    graphs = list(ir.iter_graph_protos(model.graph))
    ops = Counter(_op_name(n) for g in graphs for n in g.node)
    params, pbytes, storage = _parameters(graphs)
    init_names = {t.name for t in model.graph.initializer}
    return {
        "ir_version": model.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "nodes": sum(ops.values()),
        "subgraphs": len(graphs) - 1,
        "ops": dict(ops.most_common()),
        "parameters": sum(params.values()),
        "parameter_bytes": sum(pbytes.values()),
        "params_by_op": dict(params.most_common()),
        "bytes_by_op": dict(pbytes.most_common()),
        # weight bytes by how they are stored: what shrinks under quantization (a parameter count does not)
        "bytes_by_storage": dict(storage.most_common()),
        "model_bytes": ir.proto_size(model),
        "inputs": [{"name": i.name, "dtype": onnx.helper.tensor_dtype_to_string(i.type.tensor_type.elem_type)
                    if i.type.HasField("tensor_type") else "non-tensor", "shape": _dims(i)}
                   for i in model.graph.input if i.name not in init_names],
        "outputs": [{"name": o.name, "dtype": onnx.helper.tensor_dtype_to_string(o.type.tensor_type.elem_type)
                     if o.type.HasField("tensor_type") else "non-tensor", "shape": _dims(o)}
                    for o in model.graph.output],
    }


def _parameters(graphs: list[onnx.GraphProto]) -> tuple[Counter, Counter, Counter]:
    """(parameters, bytes) by the op type that reads them, and bytes by storage class, over initializers and
    Constant nodes (a sparse Constant counts its dense elements and the bytes really stored)."""
    consumer: dict[str, str] = {}
    for g in graphs:
        for n in g.node:
            op = _op_name(n)
            for i in n.input:
                consumer.setdefault(i, op)
    params: Counter = Counter()
    pbytes: Counter = Counter()
    storage: Counter = Counter()
    for g in graphs:
        bits = _packed_bits(g)
        for t in g.initializer:
            op = consumer.get(t.name, "(unused)")
            b = _nbytes(t)
            params[op] += _numel(t)
            pbytes[op] += b
            storage[_storage(t, op, bits.get(t.name, 4))] += b
        for n in g.node:
            if n.op_type != "Constant":
                continue
            for a in n.attribute:
                op = consumer.get(n.output[0], "(unused)")
                if a.type == onnx.AttributeProto.TENSOR:
                    k, b = _numel(a.t), _nbytes(a.t)
                    storage[_storage(a.t, op)] += b
                elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
                    sp = a.sparse_tensor
                    k = int(np.prod(sp.dims)) if len(sp.dims) else 1
                    b = _nbytes(sp.values) + _nbytes(sp.indices)
                    storage["sparse"] += b
                else:
                    continue
                params[op] += k
                pbytes[op] += b
    return params, pbytes, storage


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def format_storage(by_storage: dict[str, int]) -> str:
    """'fp32 16.0 MiB + int8 48.1 MiB' (largest first; the small integer tensors last)."""
    items = sorted(by_storage.items(), key=lambda kv: (kv[0] == "other", -kv[1]))
    return " + ".join(f"{k} {human_bytes(v)}" for k, v in items if v) or "none"


def format_summary(s: dict[str, Any]) -> str:
    """Plain-text rendering of `summarize` for the CLI."""
    lines = [f"IR version {s['ir_version']}, opsets {s['opsets']}, producer '{s['producer']}'",
             f"{s['nodes']} nodes ({s['subgraphs']} subgraphs), {s['parameters']:,} parameters, "
             f"{human_bytes(s['parameter_bytes'])} of weights ({format_storage(s.get('bytes_by_storage', {}))}), "
             f"{human_bytes(s['model_bytes'])} serialized", "",
             "inputs:"]
    lines += [f"  {i['name']}: {i['dtype']} {i['shape']}" for i in s["inputs"]]
    lines += ["outputs:"] + [f"  {o['name']}: {o['dtype']} {o['shape']}" for o in s["outputs"]]
    lines += ["", f"{'op':<28}{'count':>7}{'params':>14}{'bytes':>12}"]
    for op, k in s["ops"].items():
        lines.append(f"{op:<28}{k:>7}{s['params_by_op'].get(op, 0):>14,}{human_bytes(s['bytes_by_op'].get(op, 0)):>12}")
    if "(unused)" in s["params_by_op"]:
        lines.append(f"{'(unused initializers)':<28}{'':>7}{s['params_by_op']['(unused)']:>14,}"
                     f"{human_bytes(s['bytes_by_op']['(unused)']):>12}")
    return "\n".join(lines)


def weight_layers(model: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    """Each node that reads a weight (an initializer of rank >= 2): node name -> op, the weight's shape, the
    initializers it reads and their bytes. Read from names, dims and dtypes only (no weight data is decoded)."""
    out: dict[str, dict[str, Any]] = {}
    for g in ir.iter_graph_protos(model.graph):
        inits = {t.name: t for t in g.initializer}
        for n in g.node:
            mine = [inits[i] for i in dict.fromkeys(n.input) if i in inits]
            if not n.name or n.name in out or not any(len(t.dims) >= 2 for t in mine):
                continue
            weight = max(mine, key=_numel)
            out[n.name] = {"op": _op_name(n), "shape": list(weight.dims),
                           "initializers": [t.name for t in mine], "bytes": sum(_nbytes(t) for t in mine)}
    return out


def initializer_storage(model: onnx.ModelProto) -> dict[str, tuple[int, str]]:
    """Every initializer's (bytes, storage class as in bytes_by_storage), by name."""
    out: dict[str, tuple[int, str]] = {}
    for g in ir.iter_graph_protos(model.graph):
        consumer = {}
        for n in g.node:
            for i in n.input:
                consumer.setdefault(i, _op_name(n))
        bits = _packed_bits(g)
        for t in g.initializer:
            out.setdefault(t.name, (_nbytes(t), _storage(t, consumer.get(t.name, ""), bits.get(t.name, 4))))
    return out
