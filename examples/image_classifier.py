"""Compress an image classifier from a folder of images, then measure top-1 on labelled images calibration
never saw.

    python examples/image_classifier.py --model cnn.onnx --calibration calib_images/ --evaluation val_images/ \
        --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 -o cnn.compressed.onnx

`--calibration`: any images (searched recursively). `--evaluation`: one sub-folder per class, named by the
class index or sorted into index order (ImageFolder style). Size and channels default to the model input's.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxcomp
from onnxcomp.data import from_images


def labelled(folder: Path, args) -> tuple[list[dict], np.ndarray]:
    """Feeds of every image under folder/<class>/ and their class indices (sorted class folder order)."""
    classes = sorted((d for d in folder.iterdir() if d.is_dir()), key=lambda d: (not d.name.isdigit(), int(d.name)
                                                                                  if d.name.isdigit() else d.name))
    if not classes:
        raise SystemExit(f"{folder}: expected one sub-folder per class")
    feeds, labels = [], []
    for k, d in enumerate(classes):
        part = from_images(d, model=args.model, size=args.size, mean=args.mean, std=args.std, layout=args.layout,
                           batch_size=args.batch_size)
        feeds += part
        labels += [k] * sum(next(iter(f.values())).shape[0] for f in part)
    return feeds, np.asarray(labels)


def top1(model_path: str, feeds: list[dict], labels: np.ndarray) -> float:
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    pred = np.concatenate([sess.run(None, f)[0].argmax(-1) for f in feeds])
    return float(np.mean(pred == labels))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calibration", required=True, type=Path, help="folder of calibration images")
    ap.add_argument("--evaluation", required=True, type=Path, help="folder with one sub-folder per class")
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"))
    ap.add_argument("--mean", type=float, nargs="+", default=[0.0])
    ap.add_argument("--std", type=float, nargs="+", default=[1.0])
    ap.add_argument("--layout", default="NCHW", choices=["NCHW", "NHWC"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--preset", default="int8", help="see `onnxcomp presets` (fast and small search)")
    ap.add_argument("-o", "--output", default="model.compressed.onnx")
    args = ap.parse_args()

    # decoded, resized, normalized and checked against the model's input (a wrong size names the input)
    calibration = from_images(args.calibration, model=args.model, size=args.size, mean=args.mean, std=args.std,
                              layout=args.layout, batch_size=args.batch_size)
    evaluation, labels = labelled(args.evaluation, args)

    result = onnxcomp.compress(args.model, args.preset, calibration_data=calibration, validation_data=evaluation)
    result.save(args.output)
    print(result.report)
    print(f"\nheld-out images: {len(labels)} (calibration: {sum(len(next(iter(f.values()))) for f in calibration)})")
    print(f"top-1: original {top1(args.model, evaluation, labels):.3f}, compressed "
          f"{top1(args.output, evaluation, labels):.3f}")
    print(f"size ratio {result.report.validation.size_ratio:.3f}, latency ratio "
          f"{result.report.validation.latency_ratio:.3f}; wrote {args.output}")


if __name__ == "__main__":
    main()
