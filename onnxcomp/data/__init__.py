"""User data in and out: feeds from every accepted source, checked against a model (`feeds`), and builders that
make feeds from sentences (`from_texts`, with a tokenizer.json) and image files (`from_images`), and write them
(`to_npz`) in the forms `compress` reads."""
from .feeds import (HOLDOUT_EVERY, Feed, InputSpec, check_feeds, check_input_shapes, from_arrays, generate_feeds,
                    input_specs, load_feeds, split_holdout)
from .images import from_images
from .npz import to_npz
from .texts import from_texts

__all__ = ["Feed", "HOLDOUT_EVERY", "InputSpec", "check_feeds", "check_input_shapes", "from_arrays", "from_images", "from_texts",
           "generate_feeds", "input_specs", "load_feeds", "split_holdout", "to_npz"]
