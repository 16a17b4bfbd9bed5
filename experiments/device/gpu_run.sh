#!/usr/bin/env bash
# One device session's measurements (run from the repo root on a GPU machine; results to $OUT).
#   bash experiments/device/gpu_run.sh pop     # population training: conv impls, vmap vs sequential
#   bash experiments/device/gpu_run.sh darts   # issue-4 DARTS-space supernet step, remat off / on
# Each piece has its own timeout so one slow compile cannot take the others down. Sizes
# (H200, 2026-11-27): a bench_population run takes ~80 s (it compiles twice: once end to
# end, once to time compile_s); a DARTS-space C=16 8-cell setting did NOT finish init +
# compile within 150 s (2026-11-27); the darts part runs its settings side by side in one call.
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD
python -c "import jax; print(jax.__version__, jax.devices())" > "$OUT/devices.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$OUT/devices.txt" 2>&1
POP="--population=16 --steps=50 --channels=16 --cells=1 --batch=128 --image=28 --in_channels=1"
case "${1:-pop}" in
  pop)
    timeout 60 python experiments/device/conv_micro.py --reps=10 > "$OUT/conv_vmap.txt" 2>&1
    timeout 30 python experiments/device/conv_micro.py --population=0 --reps=10 \
      > "$OUT/conv_single.txt" 2>&1
    for impl in im2col gemm; do
      timeout 150 python experiments/bench_population.py $POP --plan=vmap --conv_impl=$impl \
        > "$OUT/pop_vmap_$impl.txt" 2>&1
    done
    timeout 150 python experiments/bench_population.py $POP --plan=sequential > "$OUT/pop_seq.txt" 2>&1
    ;;
  darts)
    # Five settings compile side by side (one process each, 16 host cores): remat off/on with
    # XLA's defaults, and two faster-compiling variants (Triton GEMM autotuning off; all
    # autotuning off), since autotuning hundreds of conv/GEMM shapes may dominate compile
    # time. Their timed steps take turns (--step_lock), so step times are not shared.
    DA=${DARTS_ARGS:-"--space=darts --channels=16 --cells=8 --batch=64 --image=32 --steps=5"}
    T=${DARTS_TIMEOUT:-520}
    one() {
      local name=$1 xla=$2; shift 2
      XLA_FLAGS="$xla" timeout "$T" python experiments/bench_darts.py $DA "$@" \
        --step_lock=/tmp/bench_darts.lock > "$OUT/darts_$name.txt" 2>&1 &
    }
    one remat0 "" --remat=0
    one remat1 "" --remat=1
    one remat0_notriton "--xla_gpu_enable_triton_gemm=false" --remat=0
    one remat0_at0 "--xla_gpu_autotune_level=0" --remat=0
    one remat1_at0 "--xla_gpu_autotune_level=0" --remat=1
    wait
    # Time left in a 600 s call: the population benchmark on the current code (~80 s).
    if [ "$SECONDS" -lt "${POP_IF_BEFORE:-420}" ]; then
      timeout 150 python experiments/bench_population.py $POP --plan=vmap > "$OUT/pop_vmap.txt" 2>&1
    fi
    ;;
esac
tail -n 3 "$OUT"/*.txt
