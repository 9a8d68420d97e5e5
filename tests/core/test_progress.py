"""Progress that tells the time left (issue 26, point 3): core.progress.time_left and ProgressClock."""

from geocate.core.progress import ProgressClock, time_left


def test_the_time_left_is_the_rate_so_far_in_words_and_silent_too_early():
    assert time_left(2.0, 0.5) == ""              # under 5 s: too early to tell
    assert time_left(60.0, 0.01) == ""            # under 2 % done: too early to tell
    assert time_left(30.0, 0.5) == "about 30 s left"
    assert time_left(60.0, 0.25) == "about 3 min left"
    assert time_left(600.0, 0.1) == "about 1 h 30 min left"
    assert time_left(100.0, 1.0) == ""            # done


def test_the_clock_keeps_the_step_and_adds_the_time_left():
    now = [0.0]
    clock = ProgressClock(clock=lambda: now[0])
    assert clock.report(0.0, "Image features") == "Image features"
    now[0] = 120.0
    assert clock.report(0.5, "") == "Image features (about 2 min left)"
    now[0] = 180.0
    assert clock.report(0.75, "Causal forest: fold 3 of 5") == "Causal forest: fold 3 of 5 (about 1 min left)"
