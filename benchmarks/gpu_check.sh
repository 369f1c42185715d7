#!/usr/bin/env bash
# The GPU check (issue 14): run on a machine with a CUDA device, ≤ 8 minutes. Prints what docs/benchmarks.md
# records for the GPU: the device-marked tests, then s/step and peak memory of one uniflow training step
# at 1B and 7B in bf16 (± gradient checkpointing) and NF4 (QLoRA).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, after `make install`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())"
$PY -m pytest -q -p no:cacheprovider -m device tests/test_device.py
$PY benchmarks/scale_bench.py --device cuda --preset random-1b --configs fp32,bf16,bf16+ckpt,nf4+ckpt --steps 3 --batch-size 4
$PY benchmarks/scale_bench.py --device cuda --preset random-7b --configs bf16+ckpt,nf4+ckpt --steps 2 --batch-size 2
