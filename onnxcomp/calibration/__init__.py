"""Calibration: streaming statistics of activations over calibration feeds, and range methods on them.

```python
from onnxcomp.calibration import collect_statistics, compute_range

stats = collect_statistics(model, ["x", "h"], feeds, histogram=True)      # {name: TensorStats}
lo, hi = compute_range(stats["h"], "percentile", qdtype="uint8")          # lo <= 0 <= hi
```
"""
from __future__ import annotations

from .cache import ProbeErrors, StatisticsCache, model_digest
from .collect import collect_statistics
from .observers import TensorObserver, TensorStats, stats_from_arrays
from .ranges import QDTYPE_RANGES, RANGE_METHODS, compute_range

__all__ = [
    "ProbeErrors",
    "StatisticsCache",
    "model_digest",
    "collect_statistics",
    "compute_range",
    "RANGE_METHODS",
    "QDTYPE_RANGES",
    "TensorStats",
    "TensorObserver",
    "stats_from_arrays",
]
