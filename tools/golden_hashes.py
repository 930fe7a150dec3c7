"""SHA-256 of the compressed model bytes for the bench recipes on the real fixtures: a refactoring guard.

    python tools/golden_hashes.py            # compare with tests/golden/compress_hashes.json, print differences
    python tools/golden_hashes.py --write    # (re)record the file
    python tools/golden_hashes.py --only fast

Each row compresses one fixture with one recipe (validate=False: the hash is of the model, not the report)
on fixed calibration samples. `fast` rows are also checked by tests/test_golden.py; the rest (sensitivity
allocation, smoothquant search on MiniLM) take minutes and are checked here. A changed hash is not a failure by
itself: the commit that changes it says why and what it measured on the task metric.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.golden_rows import DATA_FREE, GOLDEN, machine, row_hash, rows  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="record the hashes into tests/golden/")
    ap.add_argument("--only", choices=["all", "fast", "slow"], default="all")
    args = ap.parse_args(argv)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    golden.pop("_machine", None)
    fast = {k for k, _ in rows("fast")}
    changed = 0
    for key, recipe in rows(args.only):
        t0 = time.perf_counter()
        h = row_hash(key.split("/")[-1], recipe)
        old = golden.get(key, {}).get("sha256")
        mark = "same" if old == h else ("new" if old is None else "CHANGED")
        changed += mark == "CHANGED"
        print(f"{mark:8s} {key:40s} {h[:16]}  ({time.perf_counter() - t0:.1f} s)", flush=True)
        if args.write:
            golden[key] = {"sha256": h, "fast": key in fast, "data_free": key.split("/")[0] in DATA_FREE}
    if args.write:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"_machine": machine(), **dict(sorted(golden.items()))}, indent=1) + "\n")
    return 1 if changed and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
