#!/usr/bin/env bash
# The GPU runs recorded in BENCHMARKS.md, as run on the lent GPU machine.
#
#   bash tools/gpu_runs.sh ghost    OUT   # issue 5: one GPU (GPU 0), ViT-B/16, ResNet-18-GN, BERT-base
#   bash tools/gpu_runs.sh scaling  OUT   # issue 6: 1, 2, 4 GPUs, ViT-B/16, logical batch ~32k, with
#                                         # a trace of each and device busy time vs. wall time
#   bash tools/gpu_runs.sh maxbatch OUT   # issue 5: one step at each estimated largest batch
#                                         # (BENCHMARKS.md), to check that it fits
#   bash tools/gpu_runs.sh sumpath OUT    # issue 5: ResNet-18-GN, ViT-B/16 ghost: the sums' finite fast path
#                                         # (a branch) against plain selects
#   bash tools/gpu_runs.sh cmdbuf OUT     # issue 5: the branch inside CUDA graphs (XLA command buffers),
#                                         # ResNet-18-GN without them, Opacus ghost on ViT-B/16 (seventh session)
#   bash tools/gpu_runs.sh gemmflags OUT  # issue 5: ViT-B/16 ghost under XLA GEMM-emission flags (eighth session)
#   bash tools/gpu_runs.sh hostprof OUT   # issue 5: host time to issue ResNet-18-GN's steps, traced (seventh session)
#   bash tools/gpu_runs.sh ratios OUT     # issue 5: the ratios of `ghost` on the three models, no profiles
#   bash tools/gpu_runs.sh bf16 OUT       # issue 5 under mixed_bfloat16: ViT-B/16, BERT-base (16-bit norm
#                                         # products on and off), ResNet-18-GN (BENCHMARKS.md, sixth session,
#                                         # runs T, U; run V's fast-path A/B needs tree bedf25b: since then
#                                         # 16-bit taps never take the branch)
#   bash tools/gpu_runs.sh leak OUT       # whether vmap mixes examples in grouped-conv kernel gradients
#                                         # on the GPU (tools/vmap_leak.py)
#   bash tools/gpu_runs.sh gramkernel OUT # issue 5: the fused kernels (keras_dpsgd.kernels: Gram norm,
#                                         # book-keeping sum) alone, then ViT-B/16 ghost with and without them
# (Run C in BENCHMARKS.md used an earlier form of `scaling`: see git history of this file.)
#
# Wheels for what the machine lacks (keras, dp-accounting, opacus, ...) are
# installed first from .whl/ (see BENCHMARKS.md); results go to OUT.
set -uo pipefail
what=${1:?ghost or scaling}
out=${2:?output folder}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpus.txt"

# Rows "name model batch variants [NAME=VALUE | --xla_flag=value]" on stdin:
# one bench.py process per row (GPU 0, flags "${common[@]}"; a NAME=VALUE is a
# ghost setting, a --flag goes to XLA_FLAGS), JSON to $out/name.json; a row
# not started before DEADLINE_S is skipped.
bench_rows() {
  local deadline=$(( $(date +%s) + ${DEADLINE_S:-100000} )) name model batch only set xla
  while read -r name model batch only set; do
    if (( $(date +%s) > deadline )); then echo "deadline: skipped $name"; continue; fi
    xla=
    if [[ $set == --* ]]; then xla=$set set=; fi
    # (An XLA_FLAGS of only blanks makes XLA abort: it reads it as a file name.)
    xla="${XLA_FLAGS:-} $xla"; xla="${xla#"${xla%%[![:space:]]*}"}"
    env -u XLA_FLAGS ${xla:+"XLA_FLAGS=$xla"} CUDA_VISIBLE_DEVICES=0 python3 tools/bench.py --models "$model" --batch "$batch" \
      --only "$only" ${set:+--ghost-set "$set"} "${common[@]}" --json "$out/$name.json" 2>&1 \
      | grep -v "^WARNING\|^I0000\|^W0000" | grep "/ \|rror\|  ok"
  done
}

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
    python3 tools/bench.py --models bert_base --batch 32 --only keras,keras_dpsgd,opacus_ghost \
      "${common[@]}" --json "$out/bert_base.json"
    python3 tools/profile_summary.py "$prof" --steps 3 --json "$out/profile.json" > "$out/profile.txt"
    cat "$out/profile.txt"
    # One raw trace to look at offline (the ViT ghost step).
    find "$prof" -path '*vit_b16_keras_dpsgd*' -name perfetto_trace.json.gz -exec cp {} "$out/vit_ghost_trace.json.gz" \; -quit
    ;;
  scaling)
    # 1, 2, 4 GPUs (GPUs 0..k-1), one after another, each writing its JSON
    # as it finishes; a few physical batches of each timed logical step are
    # traced, and the traces summarized as device busy time vs. wall time.
    prof=/tmp/kdp_scaling_profile
    rm -rf "$prof"
    python3 tools/bench_scaling.py --gpus 1,2,4 --model vit_b16 --logical-batch 32768 --sampling-rate 0.5 \
      --logical-steps 2 --per-gpu 64 --clipping ghost --profile-dir "$prof" --profile-batches 6 \
      --json "$out/scaling.json"
    python3 tools/profile_summary.py "$prof" --gaps > "$out/profile_gaps.txt"
    cat "$out/profile_gaps.txt"
    ;;
  maxbatch)
    # The linear largest-batch estimates of the second GPU session, tried
    # (or the "model variant batch" lines in $MAXBATCH_RUNS):
    # one process per (model, variant, batch); an out-of-memory error is
    # recorded in the JSON instead of a result. Cheapest compiles first.
    export CUDA_VISIBLE_DEVICES=0
    deadline=$(( $(date +%s) + ${DEADLINE_S:-100000} ))
    while read -r model variant batch; do
      if (( $(date +%s) > deadline )); then echo "deadline: skipped $model $variant $batch"; continue; fi
      python3 tools/bench.py --models "$model" --batch "$batch" --only "$variant" --precision tf32 \
        --steps 3 --warmup 1 --dp-clipping ghost --variant-timeout 240 --log "$out/bench.log" \
        --json "$out/max_${model}_${variant}_${batch}.json" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -4
    done <<<"${MAXBATCH_RUNS:-$(cat <<'RUNS'
resnet18_gn keras_dpsgd 11912
resnet18_gn keras 11888
bert_base keras_dpsgd 400
bert_base keras 416
vit_b16 keras_dpsgd 560
vit_b16 keras 576
RUNS
)}"
    ;;
  sumpath)
    # How the book-keeping sums drop non-finite rows, tf32, against
    # non-private Keras, one process per configuration, cheapest compiles
    # first; a row not started before DEADLINE_S seconds is skipped: the
    # finite fast path (a lax.cond: the host waits for the GPU at it) and the
    # plain selects (FINITE_FAST_PATH=False). Compare pipelined ex/s and
    # dispatch ms. (Runs J and Q in BENCHMARKS.md ran ViT's two; run W also a
    # branch-free scatter of zero rows, SCATTER_ZERO_ROWS=True, which lost and
    # was removed: trees 9968f93 up to its removal have it.)
    common=(--precision tf32 --steps 20 --warmup 3 --dp-clipping ghost --variant-timeout 240 --log "$out/bench.log")
    bench_rows <<<"${SUMPATH_RUNS:-$(cat <<'RUNS'
resnet_branch resnet18_gn 256 keras,keras_dpsgd
resnet_select resnet18_gn 256 keras_dpsgd FINITE_FAST_PATH=False
vit_branch vit_b16 64 keras,keras_dpsgd
vit_select vit_b16 64 keras_dpsgd FINITE_FAST_PATH=False
RUNS
)}"
    ;;
  cmdbuf)
    # CUDA graphs (XLA command buffers), tf32: the finite fast path's branch
    # recorded into the graph (+CONDITIONAL: the host no longer waits at it),
    # and ResNet-18-GN without command buffers (what the graphs save the host);
    # then Opacus ghost on ViT-B/16 for a second reading of that ratio.
    common=(--precision tf32 --steps 20 --warmup 3 --dp-clipping ghost --variant-timeout 240 --log "$out/bench.log")
    bench_rows <<<"${CMDBUF_RUNS:-$(cat <<'RUNS'
resnet_cond resnet18_gn 256 keras_dpsgd --xla_gpu_enable_command_buffer=+CONDITIONAL
resnet_nocb resnet18_gn 256 keras,keras_dpsgd --xla_gpu_enable_command_buffer=
vit_cond vit_b16 64 keras_dpsgd --xla_gpu_enable_command_buffer=+CONDITIONAL
vit_opacus vit_b16 64 opacus_ghost
RUNS
)}"
    ;;
  gemmflags)
    # ViT-B/16 ghost, tf32, under XLA flags that change how its GEMMs are
    # emitted (eighth session): Triton GEMM fusions for every dot (the
    # book-keeping operand's row scaling can then be fused into the GEMM's
    # prologue instead of a separate pass), cuDNN GEMM fusions; non-private
    # Keras and the default DP step in the same run.
    common=(--precision tf32 --steps 20 --warmup 3 --dp-clipping ghost --variant-timeout 280 --log "$out/bench.log")
    bench_rows <<<"${GEMMFLAGS_RUNS:-$(cat <<'RUNS'
vit_default vit_b16 64 keras,keras_dpsgd
vit_triton_any vit_b16 64 keras_dpsgd --xla_gpu_triton_gemm_any=true
vit_cudnn_fusion vit_b16 64 keras_dpsgd --xla_gpu_cudnn_gemm_fusion_level=3
RUNS
)}"
    ;;
  hostprof)
    # Where the host's time to issue a step goes (ResNet-18-GN, tf32): traces
    # of non-private Keras and the DP step with command buffers kept on while
    # profiling (XLA turns them off by default then), summarized per device
    # busy time and longest host events; the raw traces come back.
    export CUDA_VISIBLE_DEVICES=0
    prof=/tmp/kdp_hostprof
    rm -rf "$prof"
    XLA_FLAGS="${XLA_FLAGS:-} --xla_enable_command_buffers_during_profiling=true" python3 tools/bench.py \
      --models resnet18_gn --batch 256 --only keras,keras_dpsgd --precision tf32 --steps 20 --warmup 3 \
      --dp-clipping ghost --variant-timeout 240 --profile-dir "$prof" --profile-steps 5 --log "$out/bench.log" \
      --json "$out/resnet.json" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | grep "/ \|rror\|  ok"
    python3 tools/profile_summary.py "$prof" --gaps > "$out/profile_gaps.txt" 2>&1
    cat "$out/profile_gaps.txt"
    for v in keras keras_dpsgd_ghost; do
      find "$prof/resnet18_gn_$v" -name perfetto_trace.json.gz -exec cp {} "$out/trace_$v.json.gz" \; -quit
    done
    ls -la "$out"
    ;;
  ratios)
    # Issue 5's ratios without the profiles of `ghost`: ViT-B/16, BERT-base,
    # then ResNet-18-GN, each against non-private Keras and Opacus ghost in
    # the same run; a model not started before DEADLINE_S seconds is skipped.
    export CUDA_VISIBLE_DEVICES=0
    deadline=$(( $(date +%s) + ${DEADLINE_S:-100000} ))
    common=(--precision tf32 --steps 20 --warmup 3 --dp-clipping ghost --variant-timeout 200 --log "$out/bench.log")
    # (RATIOS_RUNS, "model:batch:variants ...", replaces the default list.)
    for mb in ${RATIOS_RUNS:-vit_b16:64:keras,keras_dpsgd,opacus_ghost bert_base:32:keras,keras_dpsgd,opacus_ghost \
              resnet18_gn:256:keras,keras_dpsgd}; do
      IFS=: read -r model batch only <<<"$mb"
      if (( $(date +%s) > deadline )); then echo "deadline: skipped $model"; continue; fi
      python3 tools/bench.py --models "$model" --batch "$batch" --only "$only" "${common[@]}" \
        --json "$out/$model.json" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | grep "ex/s\|/ \|rror\|^model\|^-\|  ok"
    done
    ;;
  bf16)
    common=(--precision bf16 --steps 20 --warmup 3 --dp-clipping ghost --variant-timeout 250 --log "$out/bench.log")
    bench_rows <<'RUNS'
vit vit_b16 64 keras,keras_dpsgd
vit_f32norms vit_b16 64 keras_dpsgd HALF_PRECISION_NORM_PRODUCTS=False
resnet resnet18_gn 256 keras,keras_dpsgd
bert bert_base 32 keras,keras_dpsgd
bert_f32norms bert_base 32 keras_dpsgd HALF_PRECISION_NORM_PRODUCTS=False
RUNS
    ;;
  leak)
    # (Run N in BENCHMARKS.md also ran a batched, not vmapped, ghost forward
    # against the vmapped one on BERT-base and ResNet-18-GN; it was no faster
    # and was removed: `batched` in 6c7de33.)
    export CUDA_VISIBLE_DEVICES=0
    python3 tools/vmap_leak.py 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tee "$out/vmap_leak.txt"
    ;;
  gramkernel)
    # First the norm forms alone (a minute), then the ViT step with the XLA
    # Gram form and with the fused kernel, against non-private Keras.
    export CUDA_VISIBLE_DEVICES=0
    # (The sweep of tile sizes, warps and stages takes a few minutes; the
    # two ViT runs about 5. Split them over two calls if the limit is near.)
    python3 tools/bench_gram.py --batch 64 --precision tf32 --sweep --json "$out/gram_tf32.json"
    common=(--models vit_b16 --batch 64 --precision tf32 --steps 20 --warmup 3 --dp-clipping ghost
            --variant-timeout 240 --log "$out/bench.log")
    python3 tools/bench.py --only keras,keras_dpsgd "${common[@]}" --json "$out/vit_b16_xla.json"
    python3 tools/bench.py --only keras_dpsgd --gram-kernel triton --sum-kernel triton "${common[@]}" \
      --json "$out/vit_b16_triton.json"
    ;;
  *) echo "unknown: $what" >&2; exit 2 ;;
esac
