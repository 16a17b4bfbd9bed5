#!/usr/bin/env bash
# One device session's measurements (run from the repo root on a GPU machine; results to $OUT).
#   bash experiments/device/gpu_run.sh pop     # population training: vmap vs both sequential plans
#   bash experiments/device/gpu_run.sh pools   # per-conv forms; vmap with either pool form
#   bash experiments/device/gpu_run.sh darts   # issue-4 DARTS-space supernet step, remat off / on
# Each piece has its own timeout so one slow compile cannot take the others down. Sizes
# (H200): a bench_population run took ~80 s when it compiled twice (end to end, and again
# to time compile_s); it now also compiles a --short_steps program (~30 s more) to time the
# training steps alone (candidate_steps_per_s; --short_steps=0 skips it). Compare runs by
# candidate_steps_per_s_incl_init_eval (every run reports it; it is what the older
# results' candidate_steps_per_s measured). A DARTS-space C=16 8-cell setting took ~345 s
# to init + compile (2026-11-29), so the darts part runs its settings side by side in one
# call.
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD
python -c "import jax; print(jax.__version__, jax.devices())" > "$OUT/devices.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$OUT/devices.txt" 2>&1
POP="--population=16 --steps=50 --channels=16 --cells=1 --batch=128 --image=28 --in_channels=1"
case "${1:-pop}" in
  pop)
    # The figures and both denominators of the 20x ratio: the vmapped population
    # (accelerator default), the arch-as-data program one member after another
    # (`sequential`, its lax.switch a host-synchronising conditional on GPU), and the
    # specialised network of each cell (`sequential_static`, the fair sequential baseline;
    # two members only, one compile each, steady state = the ratio's denominator; no
    # --short_steps run, which would compile each cell again: its ratio is by
    # candidate_steps_per_s_incl_init_eval).
    timeout 170 python experiments/bench_population.py $POP --plan=vmap > "$OUT/pop_vmap.txt" 2>&1
    timeout 190 python experiments/bench_population.py $POP --plan=sequential > "$OUT/pop_seq.txt" 2>&1
    timeout 200 python experiments/bench_population.py ${POP/--population=16/--population=2} \
      --plan=sequential_static --no_compile_timing --short_steps=0 > "$OUT/pop_static2.txt" 2>&1
    ;;
  pools)
    # Per-conv forms, and the pools: "window" is the GPU default (740 candidate-steps/s on
    # 11-27), "sum" the CPU form that ran at 619 on 11-29 (both init and evaluation
    # included: compare candidate_steps_per_s_incl_init_eval); this pair says whether the
    # pools explain it.
    timeout 60 python experiments/device/conv_micro.py --reps=10 > "$OUT/conv_vmap.txt" 2>&1
    timeout 30 python experiments/device/conv_micro.py --population=0 --reps=10 \
      > "$OUT/conv_single.txt" 2>&1
    for pool in window sum; do
      timeout 170 python experiments/bench_population.py $POP --plan=vmap --pool_impl=$pool \
        > "$OUT/pop_vmap_$pool.txt" 2>&1
    done
    ;;
  darts)
    # Both remat settings compile side by side (one process each; 16 host cores) and take
    # turns for their timed steps (--step_lock). 2026-11-29 (H200, JAX 0.11.2): with XLA's
    # default Triton GEMMs the step's compilation aborted (openxla/xla#47381); the DARTS-space
    # programs now turn them off themselves (darts_net.compiler_options). Init took 166-196 s
    # and the step's compile 144-176 s then, before the one-draw kernel init.
    DA=${DARTS_ARGS:-"--space=darts --channels=16 --cells=8 --batch=64 --image=32 --steps=5"}
    T=${DARTS_TIMEOUT:-520}
    for r in 1 0; do
      timeout "$T" python experiments/bench_darts.py $DA --remat=$r \
        --step_lock=/tmp/bench_darts.lock > "$OUT/darts_remat$r.txt" 2>&1 &
    done
    wait
    # Time left in a 600 s call: the population benchmark on the current code (~110 s).
    if [ "$SECONDS" -lt "${POP_IF_BEFORE:-400}" ]; then
      timeout 170 python experiments/bench_population.py $POP --plan=vmap > "$OUT/pop_vmap.txt" 2>&1
    fi
    ;;
esac
tail -n 3 "$OUT"/*.txt
