#!/usr/bin/env bash
# One device session's measurements (run from the repo root on a GPU machine; results to $OUT).
#   bash experiments/device/gpu_run.sh pop     # population training: conv impls, vmap vs sequential
#   bash experiments/device/gpu_run.sh darts   # issue-4 DARTS-space supernet step, remat off / on
# Each piece has its own timeout so one slow compile cannot take the others down. Sizes
# (H200, 2026-11-27): a bench_population run takes ~80 s (it compiles twice: once end to
# end, once to time compile_s); a DARTS-space C=16 8-cell setting did NOT finish init +
# compile within 150 s, so the darts part needs more than one 600 s call for both settings.
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
    for r in 0 1; do
      timeout 280 python experiments/bench_darts.py --space=darts --channels=16 --cells=8 --batch=64 \
        --image=32 --remat=$r --steps=5 > "$OUT/darts_remat$r.txt" 2>&1
    done
    ;;
esac
tail -n 3 "$OUT"/*.txt
