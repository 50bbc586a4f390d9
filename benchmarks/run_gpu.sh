#!/usr/bin/env bash
# The GPU runs of BENCHMARKS.md in one go, most important first, each under its own time limit, so a
# short device lease still brings back whole results. Logs and JSON go to $OUT (default gpu-results/).
#   bash benchmarks/run_gpu.sh            # from the repo root, with hydra-core + omegaconf installed
#   DATA=/path/cifar10-subset.npz bash benchmarks/run_gpu.sh   # where ../shared/data is not beside the repo
#   SET=all bash benchmarks/run_gpu.sh    # also cache fidelity, the roofline and framework-overhead runs
# Needs torch, torchvision, pytorch-lightning, torchmetrics, hydra-core, omegaconf, scikit-learn, pillow.
# Without the CIFAR-10 subset, the benchmarks fall back to scikit-learn's digits.
# Budget: about 11 minutes on an H100/H200 for the default set (limits add up to 17.3), 4.5 more for SET=all;
# a 15-minute lease that must also start the machine gets the first four whole (about 8 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg WANDB_MODE=offline
PY="${PYTHON:-python}"
DATA_ARGS=()
if [ -n "${DATA:-}" ]; then DATA_ARGS=(--data "$DATA"); fi

"$PY" - <<'PYEOF' || { echo "missing packages: pip install the carried wheels first" >&2; exit 2; }
import hydra, omegaconf, pytorch_lightning, sklearn, torch, torchmetrics, torchvision  # noqa: F401
assert torch.cuda.is_available(), "no CUDA GPU visible"
print("ok:", torch.__version__, torch.cuda.get_device_name())
PYEOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv > "$OUT/nvidia-smi.csv" 2>&1

run() {  # run NAME LIMIT_S ARGS...: one benchmark, its log and JSON in $OUT, never more than LIMIT_S
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$PY" "$@" --device cuda --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
  echo "== $name exit ${PIPESTATUS[0]}"
}

# issue 18: the cached training phase, resident blocks vs per-step batches vs a plain loop on the GPU
run resident_loop 120 benchmarks/resident_loop.py --rounds 3 ${DATA_ARGS[@]+"${DATA_ARGS[@]}"}
# issue 18 (3b, 3c): resnet50 full_finetune from JPEGs (decode=torchvision workers, decode=device nvjpeg) vs the same
# steps on synthetic device tensors; bf16 + channels_last (+ compile) vs the naive fp32 loop
run feed_rate 240 benchmarks/feed_rate.py --compile ${DATA_ARGS[@]+"${DATA_ARGS[@]}"}
# issue 18 (2): decode paths per image, data.decode=device on CUDA (nvjpeg, batched) against the CPU decoders
run decode_pipeline 90 benchmarks/decode_pipeline.py ${DATA_ARGS[@]+"${DATA_ARGS[@]}"}
# photo-like files (384 px JPEG): decoding then costs what it does on real data
run cache_speedup_224_jpeg384 200 benchmarks/cache_speedup.py --image-size 224 --stored-size 384 \
  --stored-format jpeg ${DATA_ARGS[@]+"${DATA_ARGS[@]}"}
run cache_speedup_224_vgg16_jpeg384 180 benchmarks/cache_speedup.py --backbone vgg16 --image-size 224 \
  --stored-size 384 --stored-format jpeg ${DATA_ARGS[@]+"${DATA_ARGS[@]}"}
# per-step cost: fused vs foreach AdamW, alternated; where a warm run's time goes (cProfile)
run cache_speedup_64 150 benchmarks/cache_speedup.py --profile 25 --warm-variant optimizer.fused=false ${DATA_ARGS[@]+"${DATA_ARGS[@]}"}
# kernels and GPU waits per cached training step (fused AdamW on CUDA: fewer launches than on CPU)
run step_ops 60 benchmarks/step_ops.py ${DATA_ARGS[@]+"${DATA_ARGS[@]}"}
if [ "${SET:-}" = all ]; then
  # cached vs uncached features (bit-identical at the same batch size on an H100, 2026-11-26)
  run cache_fidelity_224 60 benchmarks/cache_fidelity.py ${DATA_ARGS[@]+"${DATA_ARGS[@]}"}
  run roofline 120 benchmarks/roofline.py --backbones resnet50,vgg16 --batch-size 128
  run overhead_resnet18_64 90 benchmarks/framework_overhead.py --image-size 64 --batch-size 32 --steps 100 \
    --warmup 10 --repeats 3 ${DATA_ARGS[@]+"${DATA_ARGS[@]}"}
fi
