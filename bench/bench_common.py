"""What every benchmark script shares (issue 20: the bench boilerplate in one helper)."""

import json
import os
import time


def _plain(value):
    """numpy scalars and arrays as plain numbers and lists; anything else as its text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def save_figures(path, figures, started=None):
    """Write ``figures`` as JSON to ``path`` (the script's --json; None: nothing is written), with the wall time
    since ``started`` (time.perf_counter()) as figures["seconds"] when given. Returns ``figures``."""
    if started is not None:
        figures["seconds"] = round(time.perf_counter() - started, 1)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)   # outputs/ is not in a fresh checkout
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=2, default=_plain)
    return figures
