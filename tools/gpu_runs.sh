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
    # One GPU count at a time (GPUs 0..k-1), merged at the end: 1, then 4,
    # then 2 GPUs (GPUs 0-1) while GPUs 2 and 3 re-measure the one-GPU
    # ResNet-18-GN and ViT-B/16 steps of issue 5 (separate processes; only
    # the host is shared). Everything stops in time for the merge.
    flags=(--model vit_b16 --logical-batch 32768 --sampling-rate 0.5 --logical-steps 2 --per-gpu 64
           --clipping ghost)
    python3 tools/bench_scaling.py --gpus 1 "${flags[@]}" --json /tmp/scaling_1.json
    python3 tools/bench_scaling.py --gpus 4 "${flags[@]}" --json /tmp/scaling_4.json
    left=$(( ${DEADLINE_S:-585} - SECONDS ))
    prof=/tmp/kdp_profile
    rm -rf "$prof"
    common=(--precision tf32 --steps 20 --warmup 3 --dp-clipping ghost --variant-timeout 200
            --profile-dir "$prof" --profile-steps 3)
    (CUDA_VISIBLE_DEVICES=3 timeout "$left" python3 tools/bench.py --models vit_b16 --batch 64 \
      --only keras,keras_dpsgd,opacus_ghost "${common[@]}" --json "$out/vit_b16.json" --log "$out/vit_b16.log" \
      > /tmp/vit_run.txt 2>&1) &
    (CUDA_VISIBLE_DEVICES=2 timeout "$left" python3 tools/bench.py --models resnet18_gn --batch 256 \
      --only keras,keras_dpsgd,opacus_ghost "${common[@]}" --json "$out/resnet18_gn.json" \
      --log "$out/resnet18_gn.log" > /tmp/resnet_run.txt 2>&1) &
    timeout "$left" python3 tools/bench_scaling.py --gpus 2 "${flags[@]}" --json /tmp/scaling_2.json
    wait
    python3 tools/bench_scaling.py "${flags[@]}" --merge /tmp/scaling_1.json,/tmp/scaling_2.json,/tmp/scaling_4.json \
      --json "$out/scaling.json"
    grep -h "^\[" /tmp/vit_run.txt /tmp/resnet_run.txt
    python3 tools/profile_summary.py "$prof" --steps 3 > "$out/profile.txt"
    cat "$out/profile.txt"
    ;;
  *) echo "unknown: $what" >&2; exit 2 ;;
esac
