"""Build the demo study: a simulated trial on the bundled Landsat crop, written as a GeoPackage of points.

Usage: python scripts/build_demo.py OUT.gpkg [--units N] [--seed S]

The study itself is built by geocate.core.demo (also used by the dock's "Load the demo study").
"""

import argparse
import os

# The Makefile puts the QGIS profile's plugin folder (which links the repository as 'geocate') on PYTHONPATH.
from geocate.core.demo import DEMO_RASTER, build  # noqa: F401 - build is this script's API (tests import it)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--units", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=2020)
    args = parser.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    n = build(args.out, args.units, args.seed)
    print(f"Demo study: {n} units written to {args.out}")


if __name__ == "__main__":
    main()
