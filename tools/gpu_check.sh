#!/usr/bin/env bash
# The one GPU proof: run this first on a machine with a CUDA GPU.
#
#   bash tools/gpu_check.sh [--cpu] [--only NAME,NAME...] OUT_DIR [-- EXTRA PRETRAIN ARGS...]
#
# Checks, in order (each its own piece, under its own `timeout`; a failed or timed-out piece is
# reported failed and the others still run; the whole GPU mode stays inside GPU_CHECK_BUDGET_S,
# 480 s by default, since each piece's limit is cut to what is left of it):
#   environment       python, torch, the CUDA device, deepspeed/open_clip/webdataset/pot/pydantic/DALI versions
#   cuda_tests        every test marked `cuda` (python -m pytest -m cuda ...); on --cpu all are skipped
#                     and reported skipped, never passed
#   train_zero1       launch/pretrain.py, 30 steps of a PGS config on synthetic data, accumulation 2,
#   train_zero3         log every 10 steps, a checkpoint at step 20, auto attention, ZeRO-1 / ZeRO-3
#   resume_zero1      the same run resumed from the step-20 checkpoint (fresh output dir) to step 30:
#   resume_zero3        its losses after step 20 must equal the straight run's (GPU: 1e-2 relative; CPU: 1e-5);
#                       on a GPU resume_zero3 runs with compiled blocks (model.compile=true): compile under
#                       ZeRO-3, and compiled = eager within bf16 tolerance
#   bench_loader      tools/bench_loader.py --loader dali (skipped when DALI cannot import)
#   bench_attention   tools/bench_attention.py, tools/bench_pgs.py: GPU mode only, figures into the report
#   bench_pgs
#   profile_pgs05     tools/profile_throughput.py, ViT-L/14 at batch 128 on photos, PGS-0.5 / PGS-0.3,
#   profile_pgs03       --baseline openclip (eager and compiled): GPU mode only, and only when at least
#                       120 s of the budget are left (else skipped, saying so: run them with --only)
# GPU mode: configs/vitb16_pgs03.json (ViT-B-16, bf16), micro batch 32. --cpu: configs/tiny_cpu.json
# (tiny-28, bf16 too) on the CPU, micro batch 16, about a minute in all (the test suite runs it).
#
# It writes OUT_DIR/report.json (one entry per check: name, status passed|failed|skipped, reason,
# seconds, figures), OUT_DIR/report.md, each piece's log under OUT_DIR/logs/, the runs under
# OUT_DIR/runs/ (checkpoints included), and OUT_DIR/logs.tar.gz (logs, metrics and resolved configs,
# no checkpoints); it exits 1 when any check failed, 2 on bad usage.
#   --only NAME,...       run only these pieces (the others are left out of the report)
#   -- ARGS               appended to every pretrain.py run, e.g. -- --set model.compile=true
#   PYTHON                the interpreter (default: .venv/bin/python when present, else python3)
#   GPU_CHECK_BUDGET_S    the pieces' time budget (default 480 s on a GPU, 900 with --cpu)
#   GPU_CHECK_TIMEOUT_S   a cap on every piece's own limit
#
# On a GPU machine without a package index: bring wheels of what requirements.txt lists and the
# machine lacks (deepspeed, open_clip_torch + ftfy + regex, webdataset, pot, pydantic, rich,
# safetensors; for the check pytest and scikit-image; DALI optional), install them with
# `pip install --no-index --no-deps --target DIR` and PYTHONPATH=DIR, then run this. Where only a few files
# come back from the machine, keep OUT_DIR local and bring back report.json, report.md and
# logs.tar.gz (the runs' checkpoints are GBs); commit report.json and report.md under docs/gpu_check/.
set -uo pipefail

usage() { grep -m1 '^#   bash tools/gpu_check.sh' "$0" | sed 's/^# *bash/usage: bash/' >&2; exit 2; }

MODE=gpu ONLY="" OUT_DIR=""
while (($#)); do
  case $1 in
    --cpu) MODE=cpu ;;
    --only) ONLY=${2:-}; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) [[ -z $OUT_DIR ]] || usage; OUT_DIR=$1 ;;
  esac
  shift
done
EXTRA=("$@")
[[ -n $OUT_DIR ]] || usage

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 2
LOGS=$OUT_DIR/logs RUNS=$OUT_DIR/runs
rm -rf "$LOGS" "$RUNS" "$OUT_DIR/pieces.tsv" "$OUT_DIR/report.json" "$OUT_DIR/report.md" "$OUT_DIR/logs.tar.gz"
mkdir -p "$LOGS" "$RUNS"

if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then PY=$REPO/.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1 NO_COLOR=1 TERM=${TERM:-dumb} COLUMNS=${COLUMNS:-160}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # before DeepSpeed JIT-builds an op (Hopper)

PIECES=(environment cuda_tests train_zero1 resume_zero1 train_zero3 resume_zero3 bench_loader bench_attention bench_pgs
        profile_pgs05 profile_pgs03)
if [[ -n $ONLY ]]; then
  for name in ${ONLY//,/ }; do
    [[ " ${PIECES[*]} " == *" $name "* ]] || { echo "--only: unknown piece $name (known: ${PIECES[*]})" >&2; exit 2; }
  done
fi
selected() { [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]; }

STEPS=30 RESUME_STEP=20
if [[ $MODE == gpu ]]; then
  CONFIG=configs/vitb16_pgs03.json MICRO=32 RTOL=1e-2 BUDGET=${GPU_CHECK_BUDGET_S:-480}
  LIMIT_TRAIN=150 LIMIT_RESUME=180  # resume_zero3 compiles its blocks
  PRECISION=(--set deepspeed.bf16.enabled=true)
  LOADER_ARGS=(--loader dali --device cuda --workers 4 8 --samples 1024 --batch-size 128 --batches 8 --warmup 2 --repeats 1)
else
  CONFIG=configs/tiny_cpu.json MICRO=16 RTOL=1e-5 BUDGET=${GPU_CHECK_BUDGET_S:-900}
  LIMIT_TRAIN=180 LIMIT_RESUME=180
  # bf16 as on the GPU (DeepSpeed runs it on the CPU too); the CPU is deterministic, so a resumed run
  # repeats the straight one exactly (measured: bit-equal losses under ZeRO-1 and ZeRO-3)
  PRECISION=(--set deepspeed.bf16.enabled=true)
  LOADER_ARGS=(--loader dali --device cpu --workers 1 --samples 64 --batch-size 16 --batches 4 --warmup 1 --repeats 1)
  # OpenMP threads that spin at barriers turn a shared CPU into a crawl: measured on 2 cores beside
  # another busy process, a tiny step took 11.7 s spinning and 0.22 s sleeping, with bit-equal losses
  export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
fi
STARTED=$(date +%s)
DEADLINE=$((STARTED + BUDGET))

# ----------------------------------------------------------------------------- running pieces

record() {  # record NAME STATUS EXIT_CODE SECONDS LIMIT REASON
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6//$'\t'/ }" >> "$OUT_DIR/pieces.tsv"
  printf '%-8s %-16s %7ss  %s\n' "$2" "$1" "$4" "$6"
}

skip() {  # skip NAME REASON
  selected "$1" && record "$1" skipped "" 0.0 "" "$2"
  return 0
}

BLOCKED=""  # set when nothing more can run: every later piece is skipped with this reason

piece() {  # piece NAME LIMIT_S CMD...: CMD under `timeout`, its output in logs/NAME.log
  local name=$1 limit=$2; shift 2
  selected "$name" || return 0
  [[ -z $BLOCKED ]] || { skip "$name" "$BLOCKED"; return 0; }
  local left=$((DEADLINE - $(date +%s)))
  ((limit > left)) && limit=$left
  [[ -n ${GPU_CHECK_TIMEOUT_S:-} ]] && ((limit > GPU_CHECK_TIMEOUT_S)) && limit=$GPU_CHECK_TIMEOUT_S
  if ((limit <= 0)); then
    record "$name" failed "" 0.0 0 "not run: the ${BUDGET} s budget of the whole check is spent"
    return 0
  fi
  local log=$LOGS/$name.log t0 rc=0 ms status=passed reason=""
  printf '$ %s\n' "$*" > "$log"
  [[ -n ${PIECE_NOTE:-} ]] && printf '%s\n' "$PIECE_NOTE" >> "$log"
  t0=$(date +%s%N)
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1 < /dev/null || rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  if ((rc == 124 || rc == 137)); then status=failed reason="timed out after ${limit} s"
  elif ((rc != 0)); then status=failed reason="exit code $rc"; fi
  record "$name" "$status" "$rc" "$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))" "$limit" "$reason"
}

passed() { grep -q "^$1"$'\t'passed$'\t' "$OUT_DIR/pieces.tsv" 2>/dev/null; }

echo "gpu_check ($MODE mode): $PY, output in $OUT_DIR"

# a. the environment
piece environment 60 "$PY" tools/gpu_check_report.py env --mode "$MODE" --out "$LOGS/environment.json"
if selected environment && ! passed environment; then
  BLOCKED="not run: the environment check failed (no CUDA device, or a required package missing)"
fi

needs() { local name; for name; do selected "$name" && return 0; done; return 1; }
DALI_ERROR=""
if needs cuda_tests bench_loader && ! dali_import=$(timeout 60 "$PY" -c 'import nvidia.dali' 2>&1); then
  DALI_ERROR=$(tail -n 1 <<< "$dali_import"); DALI_ERROR=${DALI_ERROR:-import failed}
fi

# b. every CUDA-only test
mapfile -t CUDA_TESTS < <(grep -rlE --include='test_*.py' '^\s*@pytest\.mark\.cuda\b|^pytestmark\b.*\bmark\.cuda\b' tests | sort)
PIECE_NOTE=""
if [[ -n $DALI_ERROR ]]; then
  for i in "${!CUDA_TESTS[@]}"; do
    if grep -qE 'nvidia\.dali|megapgs\.data\.dali\b' "${CUDA_TESTS[$i]}"; then
      PIECE_NOTE+="NOT COLLECTED: ${CUDA_TESTS[$i]} (nvidia.dali does not import: $DALI_ERROR)"$'\n'
      unset 'CUDA_TESTS[i]'
    fi
  done
  PIECE_NOTE=${PIECE_NOTE%$'\n'}
fi
if ((${#CUDA_TESTS[@]} == 0)); then
  selected cuda_tests && record cuda_tests failed "" 0.0 "" "no test file marks a test with pytest.mark.cuda"
else
  piece cuda_tests 150 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider --junitxml="$LOGS/cuda_tests.xml" "${CUDA_TESTS[@]}"
fi
PIECE_NOTE=""

# c. training under ZeRO-1 and ZeRO-3, and the resume of each from its step-20 checkpoint
TRAIN=(launch/pretrain.py --config "$CONFIG" --set data.source=synthetic --set eval.shards=null
       --set train.steps=$STEPS --set train.epochs=null --set train.micro_batch_size=$MICRO
       --set train.global_batch_size=$((2 * MICRO)) --set optim.warmup_steps=10
       --set log.every_steps=10 --set train.checkpoint_every=$RESUME_STEP --set train.keep_last=2
       --set train.resume=none --set model.attention=auto --set pgs.masking=pgs --set pgs.unmasked_tail=0
       --set eval.every_steps=0 --set eval.zeroshot=false --set eval.retrieval=false
       --set log.progress=false --set log.tensorboard=false "${PRECISION[@]}")
EXPLAIN=""
needs train_zero1 train_zero3 && EXPLAIN=$(timeout 60 "$PY" -m megapgs.config --explain 2>/dev/null)
[[ $EXPLAIN == *"pgs.packed_length"* ]] && TRAIN+=(--set pgs.packed_length=static)
[[ $EXPLAIN == *"train.contrastive_batch"* ]] && TRAIN+=(--set train.contrastive_batch=global)
for stage in 1 3; do
  run=(--set deepspeed.zero_optimization.stage=$stage)
  piece train_zero$stage $LIMIT_TRAIN "$PY" "${TRAIN[@]}" "${run[@]}" --set "train.output_dir=$RUNS/train_zero$stage" "${EXTRA[@]}"
  checkpoint=$RUNS/train_zero$stage/checkpoints/step_$(printf '%08d' $RESUME_STEP)
  compiled=()
  [[ $MODE == gpu && $stage == 3 ]] && compiled=(--set model.compile=true)
  if passed train_zero$stage && [[ -f $checkpoint/COMPLETE ]]; then
    piece resume_zero$stage $LIMIT_RESUME "$PY" "${TRAIN[@]}" "${run[@]}" "${compiled[@]}" \
      --set "train.output_dir=$RUNS/resume_zero$stage" "${EXTRA[@]}" --resume "$checkpoint"
  else
    skip resume_zero$stage "needs train_zero$stage and its step-$RESUME_STEP checkpoint, which did not pass"
  fi
done

# d. the loader and, on a GPU, the attention and PGS benchmarks
if [[ -n $DALI_ERROR ]]; then
  skip bench_loader "nvidia.dali does not import: $DALI_ERROR"
else
  piece bench_loader 60 "$PY" tools/bench_loader.py "${LOADER_ARGS[@]}"
fi
if [[ $MODE == gpu ]]; then
  piece bench_attention 60 "$PY" tools/bench_attention.py --repeats 3
  piece bench_pgs 60 "$PY" tools/bench_pgs.py --repeats 3
else
  skip bench_attention "GPU mode only"
  skip bench_pgs "GPU mode only"
fi

# e. the profiler beside OpenCLIP, ViT-L/14 (issue 13): what the budget leaves room for
for ratio in 05 03; do
  name=profile_pgs$ratio
  if [[ $MODE != gpu ]]; then
    skip $name "GPU mode only"
  elif [[ -z $ONLY ]] && (( DEADLINE - $(date +%s) < 120 )); then
    skip $name "less than 120 s of the ${BUDGET} s budget left: run it with --only $name"
  else
    piece $name 240 "$PY" tools/profile_throughput.py --config configs/vitl_pgs$ratio.json --batch 128 \
      --data photos --baseline openclip --steps 5 --warmup 2 --set eval.shards=null
  fi
done

# ----------------------------------------------------------------------------- the report
echo
"$PY" tools/gpu_check_report.py report "$OUT_DIR" --mode "$MODE" --steps $STEPS --resume-step $RESUME_STEP \
  --rtol $RTOL --started "$STARTED"
rc=$?
(cd "$OUT_DIR" && tar czf logs.tar.gz pieces.tsv report.json report.md logs \
  $(ls runs/*/metrics.jsonl runs/*/config.json 2>/dev/null)) || rc=1
exit $rc
