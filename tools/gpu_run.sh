#!/usr/bin/env bash
# Heavy real-data runs on a lent GPU machine (one call of the device tool):
#   1. train the lung U-Net on the packed lungseg data,
#   2. run benchmarks/classification.py (4 variants, ResNet50 from scratch) using those lung masks,
# and pack the exported weights, results and embeddings into $OUT/results.tgz.
# Data comes from .gpudata/ (tools/pack_dataset.py), MONAI/pydicom wheels from .whl/.
# Usage: bash tools/gpu_run.sh smoke|full
set -u
PY=${PY:-python3}; ACC=${ACC:-gpu}
mode=${1:-full}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUTD=${OUT:-/tmp/gpu_out}; mkdir -p "$OUTD"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src
$PY -c "import torch, torchvision, lightning, monai, pydicom, scipy, safetensors, pandas, sklearn; \
print('torch', torch.__version__, 'tv', torchvision.__version__, 'L', lightning.__version__, 'monai', monai.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 1

if [ "$mode" = smoke ]; then
  SEG="--epochs 1 --input-size 128"; CLS="--epochs 1 --limit 160 --image-size 64 --n-boot 50"; W=/tmp/smoke
else
  SEG="--epochs ${SEG_EPOCHS:-120} --max-minutes ${SEG_MIN:-3}"
  CLS="--epochs ${CLS_EPOCHS:-40} --max-minutes ${CLS_MIN:-1.3} --patience ${CLS_PATIENCE:-15}"; W=/tmp/full
fi
rm -rf "$W"; mkdir -p "$W"
t0=$(date +%s)
$PY -m covidcxr -v segment train --manifest .gpudata/lungseg/manifest.csv --out "$W/seg" $SEG --batch-size 32 \
  --num-workers 12 --accelerator $ACC --devices 1 --no-progress > "$W/seg.log" 2>&1
rc=$?; tail -n 25 "$W/seg.log"; echo "segment train rc=$rc after $(( $(date +%s) - t0 )) s"
[ $rc -eq 0 ] || exit 1
$PY benchmarks/classification.py --manifest .gpudata/cxr/manifest.csv --out-dir "$W/cls" --results-dir "$W/res" \
  $CLS --batch-size 64 --num-workers 12 --accelerator $ACC --save-embeddings --segmenter "$W/seg/lung_unet.safetensors" \
  > "$W/cls.log" 2>&1
rc=$?; tail -n 40 "$W/cls.log"; echo "classification rc=$rc after $(( $(date +%s) - t0 )) s"
cp "$W/seg.log" "$W/cls.log" "$W/res/" 2>/dev/null
mkdir -p "$W/pack"
cp "$W"/seg/lung_unet.* "$W"/seg/split.csv "$W"/seg/test_dice.* "$W/pack/" 2>/dev/null
cp "$W"/cls/*.npz "$OUTD/" 2>/dev/null
for d in "$W"/cls/*/; do n=$(basename "$d"); [ -f "$d/config.json" ] && cp "$d/config.json" "$W/pack/config_$n.json" \
  && cp "$d/train_summary.json" "$W/pack/summary_$n.json" 2>/dev/null; \
  [ -f "$d/logs/version_0/metrics.csv" ] && cp "$d/logs/version_0/metrics.csv" "$W/pack/history_$n.csv"; done
tar czf "$OUTD/results_$mode.tgz" -C "$W" res pack
ls -la "$OUTD"
[ $rc -eq 0 ]
