#!/usr/bin/env bash
# The README's comparison picture: two demo runs from the same data2vec-format checkpoint, the
# student cut to its first 2 blocks vs all 4, compared with d2v_plugin.cli.compare.
# Run after `make demo` (which builds demo_work/data and demo_work/init.pt).
#
#   scripts/demo_compare.sh [OUT]    # the report folder: default demo_work/compare
#                                    # (docs/demo_compare is the committed copy the README shows)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-demo_work/compare}"
for depth in 2 4; do
  rm -rf demo_work/depth$depth  # a fresh run, not a resume of an earlier one
  .venv/bin/fairseq-hydra-train --config-dir config --config-name demo common.user_dir=d2v_plugin \
    task.data=demo_work/data model.pretrained_checkpoint=demo_work/init.pt model.depth=$depth \
    checkpoint.save_dir=demo_work/depth$depth
done
.venv/bin/python -m d2v_plugin.cli.compare demo_work/depth2 demo_work/depth4 --labels "depth 2" "depth 4" \
  --out "$out"
echo "report: $out/report.md"
