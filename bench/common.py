"""What the benchmark scripts share: the machine, a timed fit, the JSON line a measuring
subprocess ends with, a table cell. Import it before TensorFlow: it quiets its C++ log."""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def machine() -> str:
    import tensorflow as tf

    return f"{os.cpu_count()} CPU cores, TensorFlow {tf.__version__}"


def images_per_second(model, data, batch_size: int, warmup: int, steps: int) -> float:
    """Training images/s of `model.fit` on `data` over `steps` steps, after `warmup`
    untimed steps (tracing)."""
    model.fit(data, steps_per_epoch=warmup, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * batch_size / (time.perf_counter() - start)


def last_json_line(stdout: str):
    """The JSON object a measuring subprocess printed last."""
    return json.loads(stdout.strip().splitlines()[-1])


def mean_cell(results, field: str, scale: float = 100, digits: int = 2) -> str:
    """A table cell: the mean of `field` over `results` (dicts), "-" if none has it."""
    import numpy as np

    values = [r[field] for r in results if r.get(field) is not None]
    return f"{scale * np.mean(values):.{digits}f}" if values else "-"
