#!/usr/bin/env bash
# The GPU runs recorded in BENCHMARKS.md, as run on the lent GPU machine.
#
#   bash tools/gpu_runs.sh ghost    OUT   # issue 5: one GPU (GPU 0), ViT-B/16, ResNet-18-GN, BERT-base
#   bash tools/gpu_runs.sh scaling  OUT   # issue 6: 1, 2, 4 GPUs, ViT-B/16, logical batch ~32k
#
# Wheels for what the machine lacks (keras, dp-accounting, opacus, ...) are
# installed first from .whl/ (see BENCHMARKS.md); results go to OUT.
set -uo pipefail
what=${1:?ghost or scaling}
out=${2:?output folder}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpus.txt"

case "$what" in
  ghost)
    export CUDA_VISIBLE_DEVICES=0
    prof=/tmp/kdp_profile
    rm -rf "$prof"
    common=(--precision tf32 --steps 20 --warmup 3 --dp-clipping ghost --variant-timeout 200
            --profile-dir "$prof" --profile-steps 3 --log "$out/bench.log")
    python3 tools/bench.py --models vit_b16 --batch 64 --only keras,keras_dpsgd,opacus_ghost \
      "${common[@]}" --json "$out/vit_b16.json"
    python3 tools/bench.py --models resnet18_gn --batch 256 --only keras,keras_dpsgd,opacus_ghost \
      "${common[@]}" --json "$out/resnet18_gn.json"
    python3 tools/bench.py --models bert_base --batch 32 --only keras,keras_dpsgd \
      "${common[@]}" --json "$out/bert_base.json"
    python3 tools/profile_summary.py "$prof" --steps 3 --json "$out/profile.json" > "$out/profile.txt"
    cat "$out/profile.txt"
    # One raw trace to look at offline (the ViT ghost step).
    find "$prof" -path '*vit_b16_keras_dpsgd*' -name perfetto_trace.json.gz -exec cp {} "$out/vit_ghost_trace.json.gz" \; -quit
    ;;
  scaling)
    python3 tools/bench_scaling.py --gpus 1,2,4 --model vit_b16 --logical-batch 32768 --sampling-rate 0.5 \
      --logical-steps 2 --per-gpu 64 --clipping ghost --json "$out/scaling.json"
    ;;
  *) echo "unknown: $what" >&2; exit 2 ;;
esac
