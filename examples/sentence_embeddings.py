"""Compress a sentence-embedding model from plain sentences and its tokenizer.json, then measure what it kept on
sentences calibration never saw: embedding cosine to the original and paraphrase retrieval.

    python examples/sentence_embeddings.py                      # the bundled MiniLM-L3, preset int8
    python examples/sentence_embeddings.py --model my.onnx --tokenizer tokenizer.json --sentences lines.txt \
        --preset fast -o my.compressed.onnx

The sentence file has one sentence per line. Retrieval assumes the first `--pairs` x 2 lines are adjacent
paraphrase pairs (as in the bundled models/sentences.txt); pass --pairs 0 for any other file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxcomp
from onnxcomp.data import from_texts

MODELS = Path(__file__).resolve().parent.parent / "models"


def embed(model_path: str, feeds: list[dict]) -> np.ndarray:
    """Unit-length sentence embeddings: the model's [batch, dim] output if it has one, else the mask-weighted
    mean of its [batch, tokens, dim] output."""
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    outs = sess.get_outputs()
    pooled = next((o.name for o in outs if o.type == "tensor(float)" and len(o.shape) == 2), None)
    tokens = next(o.name for o in outs if o.type == "tensor(float)" and len(o.shape) == 3)
    rows = []
    for feed in feeds:
        if pooled is not None:
            rows.append(sess.run([pooled], feed)[0])
        else:
            t = sess.run([tokens], feed)[0]
            mask = feed["attention_mask"][..., None].astype(np.float32)
            rows.append((t * mask).sum(1) / np.maximum(mask.sum(1), 1e-9))
    e = np.concatenate(rows)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def paraphrase_top1(e: np.ndarray, pairs: int) -> float:
    """Fraction of the first `pairs` pairs (lines 2i, 2i+1) whose nearest other sentence is its paraphrase."""
    sim = e[: 2 * pairs] @ e[: 2 * pairs].T
    np.fill_diagonal(sim, -np.inf)
    return float(np.mean(sim.argmax(1) == (np.arange(2 * pairs) ^ 1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(MODELS / "minilm-l3" / "model.onnx"))
    ap.add_argument("--tokenizer", default=str(MODELS / "tokenizer.json"))
    ap.add_argument("--sentences", default=str(MODELS / "sentences.txt"))
    ap.add_argument("--preset", default="int8", help="see `onnxcomp presets` (fast and small search)")
    ap.add_argument("--calibrate", type=int, default=64, help="sentences to calibrate on (taken after the "
                                                               "evaluation sentences)")
    ap.add_argument("--evaluate", type=int, default=200, help="sentences to evaluate on (the first lines)")
    ap.add_argument("--pairs", type=int, default=100, help="paraphrase pairs at the top of the file (0: none)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("-o", "--output", default="model.compressed.onnx")
    args = ap.parse_args()

    lines = [s for s in Path(args.sentences).read_text(encoding="utf-8").splitlines() if s.strip()]
    held, calib = lines[: args.evaluate], lines[args.evaluate: args.evaluate + args.calibrate]
    if not calib:
        raise SystemExit(f"{args.sentences} has {len(lines)} lines: none left to calibrate on after "
                         f"--evaluate {args.evaluate}")
    # tokenized and checked against the model's inputs (a wrong tokenizer or input name is a clear error)
    calibration = from_texts(calib, tokenizer=args.tokenizer, model=args.model, max_length=args.max_length)
    validation = from_texts(held, tokenizer=args.tokenizer, model=args.model, max_length=args.max_length)

    result = onnxcomp.compress(args.model, args.preset, calibration_data=calibration, validation_data=validation)
    result.save(args.output)
    print(result.report)

    ref, cand = embed(args.model, validation), embed(args.output, validation)
    cos = np.sum(ref * cand, axis=1)
    print(f"\nheld-out sentences: {len(held)} (calibration: {len(calib)} others)")
    print(f"embedding cosine to the original: mean {cos.mean():.4f}, min {cos.min():.4f}")
    pairs = min(args.pairs, len(held) // 2)
    if pairs:
        print(f"paraphrase retrieval top-1 over {pairs} pairs: original {paraphrase_top1(ref, pairs):.3f}, "
              f"compressed {paraphrase_top1(cand, pairs):.3f}")
    print(f"size ratio {result.report.validation.size_ratio:.3f}, latency ratio "
          f"{result.report.validation.latency_ratio:.3f}; wrote {args.output}")


if __name__ == "__main__":
    main()
