"""Run every pass mode over the ONNX models shipped inside the `onnx` package (backend-test corpus) and
classify each outcome: a valid model that loads in ORT, a typed onnxcomp error, skipped (ORT cannot load or run
the original), or a crash (a bug).

    python tools/robustness_corpus.py [--modes cleanup dynamic weight_only static sparsify channel lowrank] [--limit N] [-v]

Never a traceback from deep inside a dependency, never a silently invalid model: every "crash" row is a bug.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.corpus import RECIPES, corpus, run_one  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=list(RECIPES))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    models = corpus()[: args.limit]
    print(f"{len(models)} models from the onnx package's backend-test data")
    for mode in args.modes:
        counts: collections.Counter = collections.Counter()
        crashes = []
        for p in models:
            kind, msg = run_one(p, mode)
            if kind.startswith("typed") and msg.startswith("reference model:"):
                kind = "skipped"  # ORT cannot load or run the original: nothing to compare a result with
            counts[kind.split(":")[0] if kind.startswith("typed") else kind] += 1
            if kind == "CRASH" or (args.verbose and kind != "ok"):
                crashes.append((p.relative_to(p.parents[2]), kind, msg))
        print(f"{mode:12s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        for name, kind, msg in crashes:
            print(f"    {kind:24s} {name}: {msg}")


if __name__ == "__main__":
    main()
