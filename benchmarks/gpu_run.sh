#!/usr/bin/env bash
# The one prepared GPU check (issue: performance). Run on the lent device machine from the repo root:
# the image has torch + transformers; pydantic travels as wheels in .whl/ (see docs/performance.md).
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:-}:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# fitted: the pipeline's noise (PCM sample CSV fitted: tables, the compiled noise pass);
# pcm-joshi2020: the analytic PCM law (eager: its log is not the same bytes compiled); gaussian: programming only
for spec in fitted=data/chip/pcm_sample.csv pcm-joshi2020=pcm-joshi2020 gaussian=gaussian; do
  name=${spec%%=*}; noise=${spec#*=}
  timeout 150 python3 benchmarks/eval_overhead.py --device cuda --shape olmoe-1b-7b --seq-len 2048 --batch 8 \
    --batches 2 --repeats 3 --noise $noise --json 2>&1 | tee "$OUT/olmoe_$name.log" | tail -n 1 > "$OUT/olmoe_$name.json"
done
timeout 120 python3 benchmarks/eval_overhead.py --device cuda --shape olmoe-1b-7b --seq-len 2048 --batch 8 \
  --batches 2 --repeats 2 --experts-impl eager --json 2>&1 | tee "$OUT/olmoe_eager.log" | tail -n 1 > "$OUT/olmoe_eager.json"
cat "$OUT"/*.json
