"""Progress that tells the time left (issue 26, point 3): core.progress.time_left and ProgressClock."""

from geocate.core.progress import FitCount, ProgressClock, time_left


def test_the_time_left_is_the_rate_so_far_in_words_and_silent_too_early():
    assert time_left(2.0, 0.5) == ""              # under 5 s: too early to tell
    assert time_left(60.0, 0.01) == ""            # under 2 % done: too early to tell
    assert time_left(30.0, 0.5) == "about 30 s left"
    assert time_left(60.0, 0.25) == "about 3 min left"
    assert time_left(600.0, 0.1) == "about 1 h 30 min left"
    assert time_left(100.0, 1.0) == ""            # done


def test_fit_count_adds_fits_on_the_way_without_moving_the_bar_back():
    fits = FitCount(4)
    assert [fits.tick(), fits.tick()] == [0.25, 0.5]
    fits.more(2)                                  # 2 fits left and 2 more: the other half spread over 4
    assert [fits.tick() for _ in range(4)] == [0.625, 0.75, 0.875, 1.0]
    assert fits.tick() == 1.0                     # an uncounted fit stays at the end
    fits.more(0)
    assert fits.fraction() == 1.0
    fits = FitCount(4)
    fits.tick()
    fits.skip(2)                                  # two expected fits not needed: passed over
    assert fits.fraction() == 0.75 and fits.tick() == 1.0


def test_the_clock_keeps_the_step_and_adds_the_time_left():
    now = [0.0]
    clock = ProgressClock(clock=lambda: now[0])
    assert clock.report(0.0, "Image features") == "Image features"
    now[0] = 120.0
    assert clock.report(0.5, "") == "Image features (about 2 min left)"
    now[0] = 180.0
    assert clock.report(0.75, "Causal forest: fold 3 of 5") == "Causal forest: fold 3 of 5 (about 1 min left)"


def test_map_cancellable_keeps_the_items_order_and_stops_starting_items_on_cancel():
    """map_cancellable (the out-of-bag forest's bags): results and each() in the items' order, each() in the
    calling thread, whatever order the threads finish in; a cancel raises Cancelled and no further item starts; a
    worker's error reaches the caller; keep=False lets each result go once each() has seen it."""
    import threading
    import weakref

    import pytest

    from geocate.core.errors import Cancelled
    from geocate.core.progress import map_cancellable

    caller, calls = threading.current_thread(), []
    gates = [threading.Event() for _ in range(10)]

    def work(item):                               # item i waits for item i + 1: later items finish first
        if item < 9:
            gates[item + 1].wait(5)
        gates[item].set()
        return item * item

    results = map_cancellable(work, range(10), 10, lambda: False,
                              lambda i, r: calls.append((i, r, threading.current_thread() is caller)))
    assert results == [i * i for i in range(10)]
    assert calls == [(i, i * i, True) for i in range(10)]
    assert map_cancellable(lambda i: i * i, range(3), 1) == [0, 1, 4]     # one thread, no cancel: a plain loop

    started, cancel = [], threading.Event()

    def quick(item):
        started.append(item)
        return item

    with pytest.raises(Cancelled):                # cancel pressed when the first result is taken
        map_cancellable(quick, range(40), 2, cancel.is_set, lambda i, r: cancel.set(), poll_seconds=0.01)
    assert len(started) <= 6                      # of 40: at most the first item and its look-ahead ever start

    def broken(item):
        if item == 3:
            raise ValueError("bag 3 failed")
        return item

    with pytest.raises(ValueError, match="bag 3 failed"):
        map_cancellable(broken, range(8), 2, lambda: False)

    class Part:
        pass

    alive, seen = [], []
    kept = map_cancellable(lambda i: Part(), range(6), 1, None, lambda i, part: alive.append(weakref.ref(part)),
                           keep=False)
    assert kept is None and len(alive) == 6 and all(ref() is None for ref in alive)   # each let go after each()
    assert map_cancellable(lambda i: i, range(6), 2, None, lambda i, r: seen.append(r), keep=False) is None
    assert seen == list(range(6))
