"""Outputs that appear whole or not at all.

Every file a run writes (the result layer, tables, reports, plots, models,
run metadata) is first written under a temporary name beside its destination
(``units_geocate-partial-1234.gpkg`` for ``units.gpkg``) and moved into place
only when everything succeeded, so a failed, cancelled or killed run leaves the
previous good result where it was. A lock file beside each destination refuses
a second run writing the same file while the first is alive. Leftovers of a
killed run (its partial files and its lock) are swept by the next run that
writes there, once their process is gone.

Written by hand: QGIS's Processing framework writes sinks straight to their
destination and has no transaction over an algorithm's several outputs.
"""

import glob
import os
import re
import time

PARTIAL = "_geocate-partial-"
LOCK = ".geocate-lock"
#: A lock older than this is stale even if its process id is alive again (ids are reused).
STALE_LOCK_SECONDS = 24 * 3600


#: Lock files this process holds now. A lock with this process's id that is not here was left by a run of this
#: process that ended without releasing it: stale, not busy (QGIS runs every algorithm in one process).
HELD = set()


class DestinationBusy(Exception):
    """Another live run is writing this destination."""


def is_plain_file(path):
    """A destination that is a file path (not a memory layer, a database URI or an ``ogr:`` layer of a file)."""
    return bool(path) and "://" not in path and not path.startswith(("memory:", "ogr:", "postgres:", "spatialite:")) \
        and "|" not in path and os.path.isdir(os.path.dirname(os.path.abspath(path)))


def _alive(pid):
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill would terminate the process on Windows: trust the lock's age instead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def partial_name(final, pid=None):
    """The temporary name of ``final`` while a run (process ``pid``) writes it: same folder and extension, and
    no other dot (QGIS takes a GeoPackage's format from everything after the first dot of its name)."""
    folder, name = os.path.split(os.path.abspath(final))
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f"{_plain(stem)}{PARTIAL}{os.getpid() if pid is None else pid}{ext}")


def _plain(stem):
    return stem.replace(".", "_")


#: Files that belong to a shapefile (or MapInfo file) beside it.
SIDECARS = (".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx", ".qmd", ".id", ".dat", ".map", ".ind")


def _siblings(path):
    """A file and the files that belong to it (a GeoPackage's -wal, a model's .json, a shapefile's .dbf)."""
    stem = os.path.splitext(path)[0]
    return sorted({path, *glob.glob(glob.escape(path) + "*"),
                   *(stem + ext for ext in SIDECARS if os.path.exists(stem + ext))})


def sweep_leftovers(final):
    """Remove the partial files and the lock a killed run left for ``final`` (only those of dead processes)."""
    folder, name = os.path.split(os.path.abspath(final))
    stem = os.path.splitext(name)[0]
    pattern = re.compile(re.escape(f"{_plain(stem)}{PARTIAL}") + r"(\d+)\.")
    for entry in os.listdir(folder):
        match = pattern.match(entry)
        if match and not _alive(int(match.group(1))):
            try:
                os.remove(os.path.join(folder, entry))
            except OSError:
                pass


class RunFiles:
    """The files of one run: locked at the start, written under partial names, committed or removed together."""

    def __init__(self):
        self.locks = []        # lock files this run holds
        self.pending = []      # (partial path, final path)

    # -- at the start -------------------------------------------------------------------------------------------
    def lock(self, final):
        """Take ``final``'s lock (refusing if a live run holds it) and sweep a killed run's leftovers."""
        lock = os.path.abspath(final) + LOCK
        for _ in range(2):
            try:
                handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    with open(lock, encoding="ascii") as existing:
                        pid = int(existing.read().strip() or 0)
                    age = time.time() - os.path.getmtime(lock)
                except (OSError, ValueError):
                    pid, age = 0, STALE_LOCK_SECONDS
                ours_and_released = pid == os.getpid() and lock not in HELD
                if pid and not ours_and_released and _alive(pid) and age < STALE_LOCK_SECONDS:
                    raise DestinationBusy(
                        f"Another GeoCATE run (process {pid}) is writing {final} now. Wait for it to finish, or "
                        "choose another file. Nothing was computed.") from None
                try:
                    os.remove(lock)  # stale: its run was killed
                except OSError:
                    pass
                continue
            with os.fdopen(handle, "w", encoding="ascii") as out:
                out.write(str(os.getpid()))
            self.locks.append(lock)
            HELD.add(lock)
            sweep_leftovers(final)
            return
        raise DestinationBusy(f"The lock {lock} could not be taken. Remove it if no GeoCATE run is writing {final}.")

    # -- while writing ------------------------------------------------------------------------------------------
    def partial(self, final):
        """Where to write ``final`` for now (and its companions, e.g. ``.json`` beside a model)."""
        tmp = partial_name(final)
        self.pending.append((tmp, os.path.abspath(final)))
        return tmp

    def final_of(self, path):
        """The destination of a partial path (or the path itself)."""
        for tmp, final in self.pending:
            if os.path.abspath(path.split("|")[0]) == tmp:
                return final
        return path

    # -- at the end ---------------------------------------------------------------------------------------------
    def commit(self):
        """Move every partial file (with its companions) into place, then release the locks."""
        try:
            for tmp, final in self.pending:
                tmp_stem, final_stem = os.path.splitext(tmp)[0], os.path.splitext(final)[0]
                for path in _siblings(tmp):
                    if path == tmp:
                        target = final
                    elif path.startswith(tmp):
                        target = final + path[len(tmp):]
                    else:
                        target = final_stem + path[len(tmp_stem):]
                    os.replace(path, target)
            self.pending = []
        finally:
            self.release()

    def abort(self):
        """Remove every partial file; the destinations keep what they held before the run."""
        for tmp, _ in self.pending:
            for path in _siblings(tmp):
                try:
                    os.remove(path)
                except OSError:
                    pass
        self.pending = []
        self.release()

    def release(self):
        for lock in self.locks:
            HELD.discard(lock)
            try:
                os.remove(lock)
            except OSError:
                pass
        self.locks = []
