"""Models over 2 GB end to end: each recipe on a generated MatMul+Relu stack with its weights in external data.

    python tools/bench_big.py [--layers 34] [--dim 4096] [--recipes cleanup dynamic ...] [--dir DIR] [--json F]

The model (default 34 layers of 4096x4096 fp32 = 2.28 GB of weights, over protobuf's 2 GB limit) is written
once, streaming, as `big.onnx` + `big.onnx.data` (the generator never holds it in memory). Each recipe then runs
in a fresh child process (`compress(path, recipe, calibration_data=...)` + `save`), so its peak RSS
(`ru_maxrss`) is that recipe's alone; the table prints seconds, peak RSS as a multiple of the weight bytes,
output size ratio, and the validator's worst output error. Weights are seeded Gaussians (He-scaled so the
activations neither vanish nor blow up through the stack): this benchmark is about scale, not accuracy.
Reload checks: the output is loaded back from its path, passes the full checker and runs in ONNX Runtime.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

RECIPES: dict[str, Any] = {
    "cleanup": [{"type": "cleanup"}],
    "dynamic": [{"type": "cleanup"}, {"type": "quantize", "mode": "dynamic"}],
    "weight_only_int4": [{"type": "cleanup"}, {"type": "quantize", "mode": "weight_only", "weight_dtype": "int4", "block_size": 32}],
    "channel": [{"type": "cleanup"}, {"type": "sparsify", "pattern": "channel", "sparsity": 0.3,
                                      "allocation": "uniform"}],
    "lowrank": [{"type": "cleanup"}, {"type": "lowrank", "params_ratio": 0.5, "allocation": "uniform"}],
    "palettize": [{"type": "cleanup"}, {"type": "palettize", "bits": 4, "allocation": "uniform"}],
}
ALIGN = 4096  # page-aligned offsets: ONNX Runtime can map external data instead of copying it


def make_big_model(folder: Path, layers: int = 34, dim: int = 4096, seed: int = 0) -> Path:
    """Write `big.onnx` + `big.onnx.data` (weights streamed to disk layer by layer); return the model path."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    path, data_name = folder / "big.onnx", "big.onnx.data"
    rng = np.random.default_rng(seed)
    inits, nodes, offset = [], [], 0
    with open(folder / data_name, "wb") as f:
        for i in range(layers):
            w = (rng.standard_normal((dim, dim), dtype=np.float32) * np.float32(np.sqrt(2.0 / dim)))
            f.write(w.tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[dim, dim],
                            data_location=TensorProto.EXTERNAL)
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                t.external_data.add(key=k, value=v)
            offset += w.nbytes
            pad = (-offset) % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            inits.append(t)
            x = "x" if i == 0 else f"h{i - 1}"
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"matmul{i}"))
            nodes.append(helper.make_node("Relu", [f"m{i}"], ["y" if i == layers - 1 else f"h{i}"], name=f"relu{i}"))
            del w
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_big")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def calibration(dim: int, samples: int = 8, rows: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((rows, dim), dtype=np.float32)} for _ in range(samples)]


class _PeakWatcher:
    """Samples RSS (anonymous + file-backed: ORT maps external data) every 5 ms and prints the main thread's
    stack at each new peak 64 MB above the last (BENCH_BIG_PROFILE=1): ru_maxrss also counts short spikes.
    It keeps no frame between samples: a frame object held by this thread kept the locals of steps that had
    ended alive (a calibration chunk's session mapped the weights beside the next chunk's)."""

    def __init__(self) -> None:
        import threading

        self.main = threading.main_thread().ident
        self.stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        import traceback

        best = 0
        while not self.stop:
            with open("/proc/self/status") as f:
                rss = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ln.startswith(("RssAnon", "RssFile"))}
            total = rss["RssAnon"] + rss["RssFile"]
            if total > best + 64 * 2**20:
                best = total
                frame = sys._current_frames().get(self.main)
                stack = traceback.extract_stack(frame)[-8:] if frame else []
                del frame  # a held frame keeps its locals (a finished step's session, its weights) alive
                where = " <- ".join(f"{os.path.basename(f.filename)}:{f.name}:{f.lineno}" for f in reversed(stack))
                print(f"--- RSS {total / 2**30:.2f} GiB (anon {rss['RssAnon'] / 2**30:.2f}, file "
                      f"{rss['RssFile'] / 2**30:.2f}) at {where}", file=sys.stderr, flush=True)
            time.sleep(0.005)

    def report(self) -> None:
        self.stop = True


def child(recipe: str, model: Path, out: Path, dim: int) -> dict[str, Any]:
    """One recipe in this (fresh) process: compress + save; then reload the output from disk and run it."""
    import resource

    import onnxcomp
    from onnxcomp import ir

    watch = _PeakWatcher() if os.environ.get("BENCH_BIG_PROFILE") else None
    t0 = time.perf_counter()
    res = onnxcomp.compress(str(model), RECIPES[recipe], calibration_data=calibration(dim), progress=False)
    t_compress = time.perf_counter() - t0
    res.save(out)
    t_save = time.perf_counter() - t0 - t_compress
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if watch is not None:
        watch.report()
    del res
    v = res_validation = None
    files = [p for p in out.parent.iterdir() if p.name.startswith(out.name)]
    out_bytes = sum(p.stat().st_size for p in files)
    reloaded = ir.load_proto(out, load_external_data=False)  # structure only: the checker reads data by path
    import onnx
    onnx.checker.check_model(str(out), full_check=True)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, calibration(dim, 1, 2, seed=7)[0])[0]
    v = {"reload_ok": bool(np.isfinite(y).all()), "nodes_out": len(reloaded.graph.node)}
    del sess
    return {"recipe": recipe, "compress_s": round(t_compress, 1), "save_s": round(t_save, 1),
            "peak_rss": peak, "out_bytes": out_bytes, "files": sorted(p.name for p in files), **v,
            "validation": res_validation}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=34)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    ap.add_argument("--dir", type=Path, default=None, help="where the model and outputs go (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="keep a big.onnx already in --dir (same --layers/--dim)")
    ap.add_argument("--child", nargs=3, metavar=("RECIPE", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        r = child(args.child[0], Path(args.child[1]), Path(args.child[2]), args.dim)
        print("RESULT " + json.dumps(r))
        return 0
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="onnxcomp-big-")
    folder = args.dir or Path(tmp.name)
    t0 = time.perf_counter()
    weight_bytes = args.layers * args.dim * args.dim * 4
    model = folder / "big.onnx"
    data = folder / "big.onnx.data"
    if not (args.reuse and model.exists() and data.exists() and data.stat().st_size >= weight_bytes):
        model = make_big_model(folder, args.layers, args.dim)
    print(f"model: {args.layers} x MatMul({args.dim}x{args.dim})+Relu, weights {weight_bytes / 2**30:.2f} GiB in "
          f"external data; written in {time.perf_counter() - t0:.1f} s")
    rows = []
    print(f"{'recipe':18s} {'compress s':>10s} {'save s':>7s} {'peak RSS':>9s} {'x weights':>9s} {'size':>6s}  outcome")
    for name in args.recipes:
        out = folder / f"out-{name}" / "model.onnx"
        out.parent.mkdir(exist_ok=True)
        p = subprocess.run([sys.executable, __file__, "--dim", str(args.dim), "--child", name, str(model), str(out)],
                           capture_output=True, text=True)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode or line is None:
            tail = (p.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{name:18s} FAILED (exit {p.returncode}): {tail}")
            rows.append({"recipe": name, "failed": tail})
            continue
        r = json.loads(line[7:])
        rows.append(r)
        print(f"{name:18s} {r['compress_s']:10.1f} {r['save_s']:7.1f} {r['peak_rss'] / 2**30:8.2f}G "
              f"{r['peak_rss'] / weight_bytes:9.2f} {r['out_bytes'] / weight_bytes:6.3f}  "
              f"{'reloaded, checker ok, runs in ORT' if r['reload_ok'] else 'output not finite'}")
        for f in out.parent.iterdir():
            f.unlink()
    if args.json:
        args.json.write_text(json.dumps({"weight_bytes": weight_bytes, "rows": rows}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 1 if any("failed" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
