"""Feeds from sentences: tokenize with a Hugging Face `tokenizer.json` (the `tokenizers` package) into the
model's token inputs (input_ids, attention_mask, token_type_ids), checked against the model."""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import numpy as np
import onnx

from ..errors import CalibrationDataError, RecipeError
from .feeds import Feed, InputSpec, check_feeds
from .model import model_specs

#: the model input each tokenizer field feeds, by the names exporters give them
_FIELDS = {"input_ids": ("input_ids", "ids", "input"), "attention_mask": ("attention_mask", "mask"),
           "token_type_ids": ("token_type_ids", "segment_ids")}


def _tokenizer(tok: Any, max_length: int):
    """A private copy of the tokenizer (a path to tokenizer.json, or a tokenizers.Tokenizer) that truncates to
    `max_length` and does not pad (padding is per batch here; shipped tokenizer.json files often pad to 128)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise RecipeError("from_texts needs the tokenizers package: pip install tokenizers") from None
    if isinstance(tok, (str, os.PathLike)):
        path = os.fspath(tok)
        if not os.path.isfile(path):
            raise CalibrationDataError(f"tokenizer file not found: {path} (a Hugging Face tokenizer.json)")
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception type for a bad file
            raise CalibrationDataError(f"cannot read {path} as a tokenizer.json: "
                                       f"{str(e).splitlines()[0][:200]}") from None
    elif isinstance(tok, Tokenizer):
        tok = Tokenizer.from_str(tok.to_str())
    else:
        raise RecipeError(f"from_texts tokenizer: expected a path to tokenizer.json or a tokenizers.Tokenizer, got "
                          f"{type(tok).__name__}")
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def _input_names(specs: Optional[Sequence[InputSpec]], names: Optional[dict[str, str]]) -> dict[str, str]:
    """tokenizer field -> model input name, from the model's inputs (or `names`, or the usual defaults)."""
    if names:
        bad = sorted(set(names) - set(_FIELDS))
        if bad:
            raise RecipeError(f"from_texts input_names: unknown field(s) {bad}; valid: {list(_FIELDS)}")
        return dict(names)
    if specs is None:
        return {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    out = {}
    tokens = [s for s in specs if s.dtype is None or np.issubdtype(s.dtype, np.integer)]  # token ids are integers
    for field, aliases in _FIELDS.items():
        hit = next((s.name for s in tokens if s.name in aliases), None)
        if hit is not None:
            out[field] = hit
    unknown = [s.name for s in specs if s.name not in out.values()]
    if "input_ids" not in out or unknown:
        raise CalibrationDataError(
            f"from_texts: cannot tell which model input takes which token field; model inputs "
            f"{[s.name for s in specs]}, unmatched {unknown}; pass input_names={{'input_ids': ..., "
            "'attention_mask': ..., 'token_type_ids': ...}}")
    return out


def from_texts(texts: Union[Iterable[str], str, os.PathLike], tokenizer: Any = "tokenizer.json",
               model: Optional[Union[onnx.ModelProto, str, os.PathLike]] = None, max_length: int = 128,
               batch_size: int = 1, input_names: Optional[dict[str, str]] = None,
               pad_to: Optional[int] = None) -> list[Feed]:
    """One feed per `batch_size` sentences (a list, or a text file with one sentence per line), tokenized and
    truncated to `max_length`, padded to the longest in the batch (or to `pad_to` tokens, so that every feed has
    one shape); with `model`, the feeds are checked against its inputs (names, dtypes, ranks) and a mismatch
    names the input."""
    if pad_to is not None and pad_to < 1:
        raise RecipeError(f"from_texts: pad_to must be >= 1, got {pad_to}")
    if pad_to is not None:
        max_length = min(max_length, pad_to)
    if max_length < 1 or batch_size < 1:
        raise RecipeError(f"from_texts: max_length and batch_size must be >= 1, got {max_length}, {batch_size}")
    if isinstance(texts, (str, os.PathLike)):
        path = os.fspath(texts)
        if not os.path.isfile(path):
            raise CalibrationDataError(f"from_texts: text file not found: {path} (one sentence per line)")
        with open(path, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise CalibrationDataError("from_texts: expected a non-empty list of strings (or a text file)")
    tok = _tokenizer(tokenizer, max_length)
    specs = model_specs(model)
    names = _input_names(specs, input_names)
    dtypes = {s.name: (s.dtype or np.dtype(np.int64)) for s in specs} if specs else {}
    feeds = [_batch(tok, texts[i:i + batch_size], names, dtypes, pad_to)
             for i in range(0, len(texts), batch_size)]
    return check_feeds(feeds, specs, "from_texts") if specs else feeds


def _batch(tok, texts: list[str], names: dict[str, str], dtypes: dict, pad_to: Optional[int]) -> Feed:
    """One feed: the batch's token fields right-padded (id 0, mask 0) to its longest sentence (or `pad_to`)."""
    enc = tok.encode_batch(texts, add_special_tokens=True)
    width = pad_to or max(len(e.ids) for e in enc)
    pad = [width - len(e.ids) for e in enc]
    out: Feed = {}
    fields = {"input_ids": [e.ids + [0] * p for e, p in zip(enc, pad)],
              "attention_mask": [[1] * len(e.ids) + [0] * p for e, p in zip(enc, pad)],
              "token_type_ids": [e.type_ids + [0] * p for e, p in zip(enc, pad)]}
    for field, name in names.items():
        out[name] = np.asarray(fields[field], dtype=dtypes.get(name, np.int64))
    return out
