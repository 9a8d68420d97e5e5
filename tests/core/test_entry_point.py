"""./geocate, the README's entry point: on a bare Debian it installs make first, then runs the target."""

import os
import shutil
import subprocess

from conftest import ROOT


def stub(folder, name, body):
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def test_geocate_installs_make_when_missing_then_runs_the_target(tmp_path):
    """A PATH without make: apt-get (a stub here) is asked for make, then make runs the target."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "chmod"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    log = tmp_path / "calls.txt"
    stub(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}\n'
                             f'if [ "$1" = install ] || [ "$3" = install ]; then '
                             f'printf \'#!/bin/sh\\necho "make $*" >> {log}\\n\' > {bin_dir}/make; chmod +x {bin_dir}/make; fi')
    done = subprocess.run([str(ROOT / "geocate"), "test-fast"], env={"PATH": str(bin_dir)}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "apt-get update -qq" and calls[1].startswith("apt-get install") and "make" in calls[1]
    assert calls[-1] == "make test-fast"


def test_geocate_uses_the_make_it_finds():
    done = subprocess.run([str(ROOT / "geocate"), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("GNU Make")
