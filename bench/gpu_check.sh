#!/usr/bin/env bash
# The GPU check, one script: the `cuda`-marked tests, then training throughput on the GPU (seed shape,
# 32 x 128 micro-batches, `--dtype auto`), eager and with torch.compile; prints tokens/s, MFU and peak
# CUDA memory. About 3-4 minutes on one GPU (most of it torch.compile).
#
#   bash bench/gpu_check.sh                  # PYTHON=/path/to/python to choose the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
failed=0

$PY - <<'EOF' || exit 1
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA GPU visible to torch; nothing to check")
from smallm.device import peak_flops, pick_device, pick_dtype
d = pick_device("cuda")
peak = peak_flops(d)
print(f"gpu_check: {torch.cuda.get_device_name(d)}, compute capability {torch.cuda.get_device_capability(d)}, "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}, HIP {torch.version.hip}); "
      f"--dtype auto -> {pick_dtype('auto', d)}; MFU peak {peak / 1e12 if peak else 'unknown'} TFLOP/s")
EOF

echo "== tests marked cuda"
timeout 150 $PY -m pytest -m cuda -rs -q tests/test_cuda.py || failed=1

models=ours,hf
$PY -c "import transformers" 2>/dev/null || { models=ours; echo "(transformers not installed: ours only)"; }
echo "== train_throughput, eager"
timeout 60 $PY bench/train_throughput.py --device cuda --models "$models" --warmup 5 --steps 20 || failed=1
echo "== train_throughput, torch.compile"
timeout 90 $PY bench/train_throughput.py --device cuda --models ours --compile --warmup 5 --steps 20 || failed=1

[ "$failed" = 0 ] && echo "gpu_check: all passed" || echo "gpu_check: FAILED (see above)"
exit "$failed"
