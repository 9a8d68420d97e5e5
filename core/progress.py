"""Progress reporting and cancellation for long loops, throttled so that callbacks stay cheap."""

import time

from .errors import Cancelled


class Throttle:
    """``tick(fraction, message)`` reports progress and polls cancellation at most every ``interval`` seconds.

    progress(fraction, message) and is_cancelled() may be None; a cancel raises :class:`Cancelled`.
    """

    def __init__(self, progress=None, is_cancelled=None, interval=0.25):
        self.progress = progress
        self.is_cancelled = is_cancelled
        self.interval = interval
        self.last = time.monotonic()

    def tick(self, fraction, message=""):
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        if self.is_cancelled is not None and self.is_cancelled():
            raise Cancelled()
        if self.progress is not None:
            self.progress(fraction, message)


def stage(progress, start, end):
    """Map a stage's 0..1 progress onto [start, end] of the whole run (None stays None)."""
    if progress is None:
        return None
    return lambda fraction, message="": progress(start + (end - start) * fraction, message)
