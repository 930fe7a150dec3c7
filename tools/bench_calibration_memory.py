"""Peak memory of calibration vs the number of samples (streaming: it must not grow with the sample count).

    python tools/bench_calibration_memory.py [--samples 100 1000] [--method percentile]

Each run is a fresh process (so peak RSS is its own) that calibrates every MatMul input of MiniLM-L3
(static quantization's statistics pass, with histograms) over N variable-length sentences, cycling the
400 fixture sentences. Prints peak RSS per N and the ratio; the target is <= 1.10.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def child(n: int, method: str) -> None:
    import onnx

    from onnxcomp import testing
    from onnxcomp.calibration import collect_statistics, compute_range

    path = testing.minilm_path()
    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    names = sorted({nd.input[0] for nd in model.graph.node if nd.op_type == "MatMul" and nd.input[1] in inits})
    base = testing.minilm_feeds()

    class Cycle:  # a lazily indexed sequence: the feeds themselves are not multiplied in memory
        def __len__(self):
            return n

        def __getitem__(self, i):
            if isinstance(i, slice):
                return [self[j] for j in range(*i.indices(n))]
            if i >= n:
                raise IndexError(i)
            return base[i % len(base)]

        def __iter__(self):
            return (self[i] for i in range(n))

    t0 = time.perf_counter()
    stats = collect_statistics(model, names, Cycle(), histogram=True)
    ranges = {k: compute_range(v, method) for k, v in stats.items()}
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": n, "tensors": len(ranges), "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_kb / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--method", default="percentile")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.method)
        return
    rows = []
    for n in args.samples:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--method", args.method],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'samples':>8} {'tensors':>8} {'time s':>8} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['n']:8d} {r['tensors']:8d} {r['seconds']:8.1f} {r['peak_rss_mb']:12.1f}")
    if len(rows) >= 2:
        print(f"peak RSS ratio {rows[-1]['n']}/{rows[0]['n']} samples: {rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
