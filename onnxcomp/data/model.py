"""The input specs of a model given as a ModelProto or a path (None for no model), for the feed builders."""
from __future__ import annotations

import os
from typing import Optional, Union

import onnx

from .feeds import InputSpec, input_specs


def model_specs(model: Optional[Union[onnx.ModelProto, str, os.PathLike]]) -> Optional[list[InputSpec]]:
    if model is None:
        return None
    from ..ir import load_proto

    proto = model if isinstance(model, onnx.ModelProto) else load_proto(model, load_external_data=False)
    return input_specs(proto)
