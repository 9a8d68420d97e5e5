#!/usr/bin/env bash
# The demo job: build the study, run geocate:estimatecate through the real qgis_process, then make the project, map and report.
set -euo pipefail
out=${1:-outputs/demo}
here=$(cd "$(dirname "$0")/.." && pwd)
py=$here/.venv/bin/python
started=$(date +%s.%N)
rm -rf "$out" && mkdir -p "$out"
"$py" "$here/scripts/build_demo.py" "$out/units.gpkg"
echo "Running geocate:estimatecate through qgis_process ..."
qgis_process.bin --json run geocate:estimatecate -- \
  INPUT="$out/units.gpkg" TREATMENT=treated OUTCOME=outcome COVARIATES=assets COVARIATES=distance \
  RASTER="$here/resources/demo/landsat8_demo_b234.tif" PATCH_SIZE=33 SEED=42 \
  OUTPUT="$out/result.gpkg" OUTPUT_REPORT="$out/report.html" > "$out/qgis_process.json" 2> "$out/qgis_process.log" || {
  echo "qgis_process failed; its log:"; tail -n 30 "$out/qgis_process.log"; exit 1; }
"$py" "$here/scripts/finish_demo.py" "$out" --started "$started"
