#!/usr/bin/env bash
# The command-line route, end to end: look at a model, turn a folder of images into calibration feeds,
# compress with a YAML recipe, write the HTML report, and check the result again on its own.
#
#   bash examples/cli.sh MODEL.onnx IMAGES_DIR OUT_DIR [RECIPE.yaml]
#
# Exit codes of `onnxcomp compress`: 0 ok, 1 accuracy budget not met (the model is still written), 2 bad input.
set -euo pipefail
model="$1"; images="$2"; out="$3"
recipe="${4:-$(dirname "$0")/recipe.yaml}"
mkdir -p "$out"

onnxcomp inspect "$model"
onnxcomp data images "$images" --model "$model" -o "$out/calib.npz"
onnxcomp compress "$model" -o "$out/model.compressed.onnx" --recipe "$recipe" \
  --calibration "$out/calib.npz" --report "$out/report.html" --report "$out/report.json"
onnxcomp validate "$model" "$out/model.compressed.onnx" --inputs "$out/calib.npz"
echo "wrote $out/model.compressed.onnx, $out/report.html and $out/report.json"
