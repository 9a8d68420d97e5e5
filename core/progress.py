"""Progress reporting and cancellation for long loops, throttled so that callbacks stay cheap."""

import gc
import threading
import time

from .errors import Cancelled


def collect_due():
    """Run the collections the automatic collector would have run by now (generation by generation, when its
    count passed its threshold: pyqtgraph's GarbageCollector.check), so that a collection driven from one
    thread costs what the automatic one would, not a full collection each time."""
    counts, thresholds = gc.get_count(), gc.get_threshold()
    for generation in range(3):
        if counts[generation] > thresholds[generation]:
            gc.collect(generation)


class collection_here:  # noqa: N801 - used as a context manager
    """While a block of the main thread waits for a worker thread (run_cancellable, below), automatic
    collection is off and ``tick()`` collects in this thread instead: a collection that fires in the worker
    deletes main-thread Qt objects caught in cycles and crashes QGIS (provider/collector.py does the same for a
    run in a background task). Outside the main thread, or when collection is already off, it does nothing."""

    def __enter__(self):
        self.active = threading.current_thread() is threading.main_thread() and gc.isenabled()
        if self.active:
            gc.disable()
        return self

    def tick(self):
        if self.active:
            collect_due()

    def __exit__(self, *exc):
        if self.active:
            gc.enable()
        return False


def time_left(elapsed, fraction, min_elapsed=5.0, min_fraction=0.02):
    """The remaining time of a run ``fraction`` done after ``elapsed`` seconds, in words ("about 3 min left"), or
    "" while too little is done to tell. Linear in the fraction done, so as rough as the fractions the run's stages
    were given: "about"."""
    if elapsed < min_elapsed or fraction < min_fraction or fraction >= 1:
        return ""
    seconds = elapsed * (1 - fraction) / fraction
    if seconds < 60:
        return f"about {max(int(round(seconds / 10.0)) * 10, 10)} s left"
    minutes = int(round(seconds / 60.0))
    if minutes < 60:
        return f"about {minutes} min left"
    return f"about {minutes // 60} h {minutes % 60:02d} min left"


class ProgressClock:
    """Progress with the time left: ``report(fraction, message)`` gives the message to show, the last non-empty
    message followed by :func:`time_left` (issue 26: at 10^5 to 10^6 units a run takes minutes to hours)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.began = clock()
        self.message = ""

    def report(self, fraction, message=""):
        self.message = message or self.message
        left = time_left(self.clock() - self.began, fraction)
        return f"{self.message} ({left})" if left and self.message else (self.message or left)


class FitCount:
    """Progress as fits done out of fits expected, where more fits can be added on the way (a merge of clusters
    refits the final model): ``more(n)`` adds n fits without moving the bar back, and what is left of the bar is
    spread over the fits still to come; ``skip(n)`` moves it on past n expected fits that will not run. ``tick()``
    counts one fit and returns the fraction done (0..1)."""

    def __init__(self, total):
        self.base, self.done, self.total = 0.0, 0, max(int(total), 1)

    def fraction(self):
        return min(self.base + (1.0 - self.base) * self.done / self.total, 1.0)

    def tick(self):
        self.done += 1
        return self.fraction()

    def more(self, n):
        self.base = self.fraction()
        self.total = max(self.total - self.done, 0) + max(int(n), 0) or 1
        self.done = 0

    def skip(self, n):
        """n expected fits that will not run (room kept for refits that were not needed): counted as done."""
        self.done = min(self.done + max(int(n), 0), self.total)


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


def run_cancellable(work, is_cancelled=None, poll_seconds=0.25):
    """Run ``work()`` in a worker thread, polling ``is_cancelled`` every ``poll_seconds``.

    econml's forests offer no callback, so a fold cannot be interrupted from
    inside; instead the caller stops waiting at once on cancel (raising
    Cancelled) and the abandoned fold finishes in the background, its result
    discarded.
    """
    if is_cancelled is None:
        return work()
    return map_cancellable(lambda _: work(), [None], 1, is_cancelled, poll_seconds=poll_seconds)[0]


def map_cancellable(work, items, threads, is_cancelled=None, each=None, poll_seconds=0.25, keep=True):
    """[work(item) for item in items], run in ``threads`` worker threads, as one pool (a thread takes the next item
    as soon as it is free; at most 2 ``threads`` items run or wait ahead of the one the caller takes next). The
    calling thread takes the results in the items' order, calls ``each(index, result)`` for each (progress, sums
    added in a fixed order) and polls ``is_cancelled`` before each result and every ``poll_seconds`` while it
    waits: on cancel no further item starts, the running ones finish in the background (their results discarded)
    and Cancelled is raised. A worker's exception is raised here. ``keep`` False: results are let go once ``each``
    has seen them (returns None), so memory holds a few items' results, not all. One thread and no is_cancelled: a
    plain loop."""
    items = list(items)
    results = [] if keep else None
    if threads <= 1 and is_cancelled is None:
        for index, item in enumerate(items):
            result = work(item)
            if each is not None:
                each(index, result)
            if keep:
                results.append(result)
        return results
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout

    stop = threading.Event()

    def unless_stopped(item):
        if stop.is_set():
            return None
        return work(item)

    executor = ThreadPoolExecutor(max_workers=max(1, threads))
    ahead = 2 * max(1, threads)
    with collection_here() as collection:   # cycles are collected here, never in a worker (collection_here)
        try:
            futures = {}
            for index in range(len(items)):
                for later in range(index, min(index + ahead + 1, len(items))):
                    if later not in futures:
                        futures[later] = executor.submit(unless_stopped, items[later])
                future = futures.pop(index)
                while True:
                    if is_cancelled is not None and is_cancelled():
                        stop.set()
                        raise Cancelled()
                    try:
                        result = future.result(timeout=poll_seconds)
                        break
                    except FutureTimeout:  # not the built-in TimeoutError before Python 3.11
                        collection.tick()
                del future
                if each is not None:
                    each(index, result)
                if keep:
                    results.append(result)
                del result
                collection.tick()
        finally:
            stop.set()
            executor.shutdown(wait=False)
    return results
