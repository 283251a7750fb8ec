#!/usr/bin/env bash
# Regenerate the README's figures: one simulated video per pattern class (contact sheet of
# frames with the ground-truth active cells and the calcium traces), seed 0.
set -euo pipefail
cd "$(dirname "$0")/.."
out=var/readme-sim
rm -rf "$out"
.venv/bin/calseg simulate "$out" --videos 4 --classes spikes,transients,waves,fluttering --seed 0 --preview
mkdir -p docs/img
i=0
for cls in spikes transients waves fluttering; do
  cp "$out/v00$i/preview.png" "docs/img/sim_$cls.png"
  i=$((i + 1))
done
ls -la docs/img
