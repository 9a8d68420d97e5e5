"""Follow one estimatecate run through the code, before and after a restructuring (issue 20's walk).

Usage: python bench/bench_walk.py --before REF [--after REF] [--depth 1 2]

Each version (a git commit; --after defaults to the working tree) runs core.pipeline.estimate_cate on the same
simulated trial (300 units on the demo imagery) under a tracer that records every call of GeoCATE's own code made
from estimate_cate (depth 1) or one level below (depth 2). Printed per version and depth: the calls, the stops
(the files in the order the run enters them, a file counted again only after another was entered), the files
visited, and the returns (entries into a file the run had already left).
"""

import argparse
import json
import os
import subprocess
import tempfile

from bench_same_numbers import DEMO_RASTER, ROOT, checkout_of, run_version

WALK = r'''
import json, os, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, sys.argv[2])
from geocate.core import pipeline   # the version under test, before conftest puts the installed plugin first
from geocate.core.simulate import simulate_trial
from conftest import unit_table
root = os.path.realpath(sys.argv[1] + "/geocate")
assert os.path.realpath(pipeline.__file__).startswith(root), pipeline.__file__
units = unit_table(simulate_trial(sys.argv[3], n_units=300, seed=3))
target, limit, seq = pipeline.estimate_cate.__code__, int(sys.argv[4]), []

def ours(code):   # GeoCATE's core (not the tests, nor packages in a virtual environment inside the checkout)
    path = os.path.realpath(code.co_filename)
    return path.startswith(root + os.sep + "core" + os.sep) and "<" not in code.co_name

def tracer(frame, event, arg):
    if event == "call" and ours(frame.f_code):
        parent, depth = frame.f_back, 1
        while parent is not None and depth <= limit:
            if parent.f_code is target:
                seq.append(os.path.relpath(os.path.realpath(frame.f_code.co_filename), root))
                break
            depth += ours(parent.f_code)
            parent = parent.f_back

sys.settrace(tracer)
pipeline.estimate_cate(units, sys.argv[3], seed=1, n_filters=64)
sys.settrace(None)
stops, left, returns, here = [], set(), 0, "core/pipeline.py"
for path in seq:
    if path != here:
        returns += path in left
        left.add(here)
        here = path
        stops.append(path)
print(json.dumps({"calls": len(seq), "stops": len(stops), "files": len(set(seq) | {"core/pipeline.py"}),
                  "returns": returns}))
'''


def walk(checkout, depth):
    out = run_version(checkout, WALK, os.path.join(ROOT, "tests"), DEMO_RASTER, depth)
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default=None)
    parser.add_argument("--depth", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="geocate-walk-")
    for name, ref in (("before", args.before), ("after", args.after)):
        checkout = checkout_of(ref, os.path.join(folder, name))
        try:
            for depth in args.depth:
                print(f"{name} ({ref or 'working tree'}), depth {depth}: {json.dumps(walk(checkout, depth))}",
                      flush=True)
        finally:
            if ref is not None:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", checkout], capture_output=True)


if __name__ == "__main__":
    main()
