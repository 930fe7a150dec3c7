"""Feeds from image files: decode (Pillow), resize, scale, normalize, lay out as the model's image input, check."""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import onnx

from ..errors import CalibrationDataError, RecipeError
from .feeds import Feed, InputSpec, check_feeds
from .model import model_specs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _paths(src: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]) -> list[Path]:
    if isinstance(src, (str, os.PathLike)):
        p = Path(os.fspath(src))
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise CalibrationDataError(f"from_images: no image files ({', '.join(IMAGE_SUFFIXES)}) under {p}")
            return files
        src = [p]
    files = [Path(os.fspath(f)) for f in src]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CalibrationDataError(f"from_images: file(s) not found: {', '.join(missing[:5])}")
    if not files:
        raise CalibrationDataError("from_images: no images given")
    return files


def _image_spec(specs: Optional[Sequence[InputSpec]], input: Optional[str]) -> Optional[InputSpec]:
    """The model input the images feed: `input`, or the only 4-D float input."""
    if specs is None:
        return None
    if input is not None:
        hit = [s for s in specs if s.name == input]
        if not hit:
            raise CalibrationDataError(f"from_images: the model has no input '{input}'; its inputs: "
                                       f"{[s.name for s in specs]}")
        return hit[0]
    cands = [s for s in specs if s.shape is not None and len(s.shape) == 4]
    if len(cands) != 1 or len(specs) != 1:
        raise CalibrationDataError(f"from_images: cannot tell which input takes the images (inputs "
                                   f"{[(s.name, s.shape) for s in specs]}); pass input=NAME")
    return cands[0]


def _geometry(spec: Optional[InputSpec], layout: str, size, channels) -> tuple[tuple[int, int], int]:
    """(height, width), channels: given, else the model input's static dims (an error when neither says)."""
    dims = list(spec.shape) if spec is not None and spec.shape is not None else [None] * 4
    c_dim, h_dim, w_dim = (dims[1], dims[2], dims[3]) if layout == "NCHW" else (dims[3], dims[1], dims[2])
    if size is None:
        if not (isinstance(h_dim, int) and isinstance(w_dim, int)):
            where = "no model given" if spec is None else f"the model input '{spec.name}' has no static height/width"
            raise RecipeError(f"from_images: {where} ({dims}); pass size=(height, width)")
        size = (h_dim, w_dim)
    if isinstance(size, int):
        size = (size, size)
    if channels is None:
        channels = c_dim if isinstance(c_dim, int) else 3
    if channels not in (1, 3):
        raise RecipeError(f"from_images: {channels} channels; images decode to 1 (grayscale) or 3 (RGB)")
    return (int(size[0]), int(size[1])), int(channels)


def from_images(images: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]],
                model: Optional[Union[onnx.ModelProto, str, os.PathLike]] = None, size=None,
                mean: Union[float, Sequence[float]] = 0.0, std: Union[float, Sequence[float]] = 1.0,
                scale: float = 1 / 255, layout: str = "NCHW", input: Optional[str] = None,
                channels: Optional[int] = None, batch_size: int = 1) -> list[Feed]:
    """One feed per `batch_size` images (a folder, searched recursively in sorted order, or a list of paths):
    each resized to `size` (default: the model input's static H, W), pixels times `scale`, then
    (x - mean) / std per channel, as float32 in `layout`. With `model`, the feeds are checked against its input
    (a wrong size names the input and the shape it expects)."""
    if layout not in ("NCHW", "NHWC"):
        raise RecipeError(f"from_images layout: invalid value {layout!r}; valid: ['NCHW', 'NHWC']")
    if batch_size < 1:
        raise RecipeError(f"from_images: batch_size must be >= 1, got {batch_size}")
    try:
        from PIL import Image
    except ImportError:
        raise RecipeError("from_images needs Pillow: pip install pillow") from None
    paths = _paths(images)
    specs = model_specs(model)
    spec = _image_spec(specs, input)
    (h, w), c = _geometry(spec, layout, size, channels)
    mean_a = np.asarray(mean, np.float32).reshape(-1)
    std_a = np.asarray(std, np.float32).reshape(-1)
    if mean_a.size not in (1, c) or std_a.size not in (1, c) or not np.all(std_a > 0):
        raise RecipeError(f"from_images: mean/std need 1 or {c} values (std > 0), got {mean_a.tolist()}, "
                          f"{std_a.tolist()}")
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32)
        except OSError as e:
            raise CalibrationDataError(f"from_images: cannot decode {path}: {e}") from None
        a = (a.reshape(h, w, c) * scale - mean_a) / std_a
        arrays.append(a.transpose(2, 0, 1) if layout == "NCHW" else a)
    name = spec.name if spec is not None else (input or "input")
    feeds = [{name: np.ascontiguousarray(np.stack(arrays[i:i + batch_size]).astype(np.float32))}
             for i in range(0, len(arrays), batch_size)]
    return check_feeds(feeds, specs, "from_images") if specs else feeds
