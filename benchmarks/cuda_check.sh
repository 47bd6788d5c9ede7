#!/usr/bin/env bash
# The CUDA path, end to end, on a machine with an NVIDIA GPU:
#   bash benchmarks/cuda_check.sh DATA_DIR [OUT_DIR]
# the seed command on the GPU, --deterministic reproducibility, the tests that run on CUDA,
# and the epoch benchmark on the GPU.
set -euo pipefail
data_dir=$1
out=${2:-cuda-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

echo "== seed command on CUDA"
python3 train_mnist.py --epochs=5 --lr=1e-3 --batch_size=64 --device cuda --data-dir "$data_dir" \
  --log-dir "$out/runs" --run-name seed-cuda 2> "$out/seed-stderr.txt"
tail -c 2000 "$out/seed-stderr.txt" | tr '\r' '\n' | grep -v "batch/s" || true

echo "== --deterministic twice: identical weights?"
for name in det-a det-b; do
  python3 train_mnist.py --epochs 2 --deterministic --device cuda --data-dir "$data_dir" \
    --log-dir "$out/runs" --run-name $name --num-embeddings 0 2>/dev/null | grep "Test accuracy"
done
python3 - "$out/runs" <<'PY'
import sys, torch
a, b = (torch.load(f"{sys.argv[1]}/{n}/checkpoints/last.pt", weights_only=True)["model"] for n in ("det-a", "det-b"))
print("deterministic CUDA runs bit-identical:", all(torch.equal(a[k], b[k]) for k in a))
PY

echo "== torchrun, one process per GPU (nccl)"
ngpu=$(nvidia-smi -L | wc -l)
torchrun --standalone --nproc_per_node="$ngpu" train_mnist.py --epochs 2 --device cuda --data-dir "$data_dir" \
  --log-dir "$out/runs" --run-name torchrun-cuda --num-embeddings 0 2>/dev/null

echo "== tests that run on CUDA"
MNIST_DATA_DIR="$data_dir" python3 -m pytest -q -p no:cacheprovider -k "device or real_mnist" tests/ 2>&1 | tail -5

echo "== epoch benchmark on CUDA"
python3 benchmarks/epoch_speed.py --data-dir "$data_dir" --device cuda --repeats 3 2>&1 | tail -9
