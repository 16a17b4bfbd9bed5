#!/usr/bin/env bash
# One device session's measurements (run from the repo root on a GPU machine; results to $OUT).
# Each piece has its own timeout so one slow compile cannot take the others down.
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD
python -c "import jax; print(jax.__version__, jax.devices())" > "$OUT/devices.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$OUT/devices.txt" 2>&1
POP="--population=16 --steps=50 --channels=16 --cells=1 --batch=128 --image=28 --in_channels=1"
timeout 120 python experiments/bench_population.py $POP --plan=vmap > "$OUT/pop_vmap.txt" 2>&1
timeout 200 python experiments/bench_darts.py --space=darts --channels=16 --cells=8 --batch=64 \
  --image=32 --remat=0,1 --steps=5 > "$OUT/darts.txt" 2>&1
timeout 150 python experiments/bench_population.py $POP --plan=sequential_static > "$OUT/pop_seq_static.txt" 2>&1
timeout 80 python experiments/bench_population.py $POP --plan=map > "$OUT/pop_map.txt" 2>&1
tail -n 2 "$OUT"/*.txt
