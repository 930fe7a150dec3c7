"""The main job on bundled real models: compress, print the report and task accuracy on held-out data.

    python tools/demo.py [--out out/] [--recipe r.yaml]

MiniLM-L3 (sentence embeddings), default recipe: report + embedding cosine and paraphrase retrieval vs fp32.
Digits CNN (image classifier), the `fast` preset (the auto search; the default recipe does nothing to Convs on
a CPU): report with every candidate it measured + held-out top-1, compressed vs original.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import onnxcomp  # noqa: E402
from onnxcomp import testing  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out", help="directory for the compressed models and reports")
    ap.add_argument("--recipe", default=None, help="recipe file (default: onnxcomp's default recipe)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print("== MiniLM-L3 sentence embeddings (paraphrase-MiniLM-L3-v2, fp32) ==")
    minilm = testing.minilm_path()
    calib = testing.minilm_feeds(n=64, start=200)  # unpaired sentences for calibration
    evals = testing.minilm_feeds(n=200, start=0)  # the 100 paraphrase pairs for evaluation
    res = onnxcomp.compress(minilm, args.recipe, calibration_data=calib, validation_data=evals[:64])
    res.save(out / "minilm-l3.compressed.onnx")
    res.report.to_html(out / "minilm-l3.report.html")
    print(res.report)
    ref = testing.minilm_embed(minilm, evals)
    cand = testing.minilm_embed(res.model, evals)
    m = testing.minilm_metrics(ref, cand)
    print(f"  task      embedding cosine mean {m['cosine_mean']:.6f} (min {m['cosine_min']:.6f}); paraphrase "
          f"retrieval top-1 {m['pair_top1']:.3f} vs fp32 {m['ref_pair_top1']:.3f} "
          f"(ratio {m['pair_top1'] / m['ref_pair_top1']:.3f}); nearest-neighbour agreement "
          f"{m['neighbor_agreement']:.3f}")

    print(f"\n== Digits CNN (scikit-learn digits, 500 held-out images), {args.recipe or 'preset fast'} ==")
    cnn = testing.digits_cnn_path()
    d = testing.digits_data()
    calib = [{"input": d["x_calib"][i:i + 1]} for i in range(64)]
    res = onnxcomp.compress(cnn, args.recipe or "fast", calibration_data=calib)
    res.save(out / "digits_cnn.compressed.onnx")
    print(res.report)
    t_ref = testing.digits_top1(cnn, d["x_test"], d["y_test"])
    t_new = testing.digits_top1(res.model, d["x_test"], d["y_test"])
    print(f"  task      top-1 {t_new:.4f} vs original {t_ref:.4f} (ratio {t_new / t_ref:.4f})")
    print(f"\noutputs and HTML report in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
