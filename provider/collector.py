"""Python's cycle collector kept in QGIS's main thread while GeoCATE runs in the background.

CPython collects reference cycles in whichever thread crosses the allocation threshold. A GeoCATE run in a
background task (the dock, a Processing dialog) allocates a great deal, so collections happened in the task's
thread, where they deleted main-thread Qt objects caught in cycles (a closed dialog's widgets, a timer): Qt aborts
or QGIS crashes, at random ("Fatal Python error: Segmentation fault" in one test run of four). While a run is off
the main thread, automatic collection is therefore off and a main-thread timer collects instead (the pattern of
calibre, pyqtgraph and novelWriter); when the last run ends the timer collects once more and gives the collector
its previous state back.

``install()`` (main thread, when the provider is loaded) starts the timer; ``hold()`` / ``release()`` bracket a
run (nested and from any thread). Without an installed timer (a script that runs tasks without the plugin),
``release()`` gives the collector back itself.
"""

import gc
import threading

INTERVAL_MS = 1000   # main-thread collection while a run is held: memory grows for a second at most

_lock = threading.Lock()
_held = 0
_restore = None      # gc.isenabled() before the first hold; None when nothing is to be given back
_timer = None


def in_main_thread():
    from qgis.PyQt.QtCore import QCoreApplication, QThread

    app = QCoreApplication.instance()
    return app is None or QThread.currentThread() == app.thread()


def hold():
    """A run starts (in the main thread before a task is queued, or in the task's thread): no automatic
    collection until the matching ``release()``."""
    global _held, _restore
    with _lock:
        if _held == 0 and _restore is None:
            _restore = gc.isenabled()
        gc.disable()
        _held += 1


def release():
    """A run ends. The main-thread timer collects and restores the collector; without one, it is restored here."""
    global _held, _restore
    with _lock:
        _held = max(0, _held - 1)
        if _held == 0 and _timer is None and _restore is not None:
            if _restore:
                gc.enable()
            _restore = None


def held():
    with _lock:
        return _held


def collect():
    """The timer's slot (main thread): collect while a run is held; after the last one, collect and restore."""
    global _restore
    from ..core.progress import collect_due

    with _lock:
        if _restore is None:
            return
        busy = _held > 0
    if busy:   # what the automatic collector would have done by now, generation by generation
        collect_due()
        return
    gc.collect()
    with _lock:
        if _held == 0 and _restore is not None:
            if _restore:
                gc.enable()
            _restore = None


class held_off_main_thread:  # noqa: N801 - used as a context manager
    """``hold()`` for the duration of a block when it runs outside the main thread; nothing in the main thread
    (qgis_process, processing.run, a dialog without a task), where collection is already in the right place."""

    def __enter__(self):
        self._held = not in_main_thread()
        if self._held:
            hold()
        return self

    def __exit__(self, *exc):
        if self._held:
            release()
        return False


def install():
    """Start the main-thread timer (idempotent; call in the main thread)."""
    global _timer
    if _timer is not None or not in_main_thread():
        return
    from qgis.PyQt.QtCore import QTimer

    _timer = QTimer()
    _timer.setInterval(INTERVAL_MS)
    _timer.timeout.connect(collect)
    _timer.start()


def uninstall():
    """Stop the timer (plugin unload) and give the collector back if a run still held it."""
    global _timer, _held, _restore
    if _timer is not None:
        _timer.stop()
        _timer = None
    with _lock:
        if _restore is not None and _held == 0:
            if _restore:
                gc.enable()
            _restore = None
