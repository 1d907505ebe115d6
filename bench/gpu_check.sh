#!/usr/bin/env bash
# The first-GPU check (issue 13 §3): one script, under 8 minutes on one GPU, that runs what no
# CPU can tell us and prints a short report. `bench/gpu_check.sh --help` says what it runs;
# `--dry-run` prints every command without running anything (no GPU needed), and
# tests/test_gpu_check.py checks on CPU that each of those commands parses.
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
STAGES=(tests train decode continual throughput)

usage() {
    cat <<'EOF'
usage: bench/gpu_check.sh [OUT] [--work DIR] [--only STAGE[,STAGE...]] [--dry-run]
                          [--time-limit SECONDS] [--peak-flops FLOPS]
                          [--warmup-steps N] [--continual-steps N]

memory3's first-GPU check (issue 13 §3). On one CUDA GPU, in under 8 minutes, runs these stages
in order, each under `timeout`; a stage that fails is reported and the next one still runs:

  tests       tests/test_kernels.py on the GPU: the Triton kernel compiled, against the PyTorch
              path in fp32 (1e-4: no TF32) and bf16 at the test and model shapes, and the
              training path's dispatch and bf16 backward
  train       `small` warmup then continual training, each through the deepspeed launcher
              (1 GPU, NCCL, bf16; 300 + 200 steps), with a memory bank built between them;
              tokens/s, MFU and peak memory come from each run's metrics.jsonl
  decode      bench/decode_memory.py at the reference shape (128-token references, a
              2,048-token window filled by 960 new tokens), bf16, on the GPU
  continual   bench/continual_step.py: a continual step against a warmup step, bf16, at the
              reference's sequence of 2,048 (batch 2)
  throughput  bench/train_throughput.py, ours against Hugging Face Llama, at `small`
              (8 x 512) and at the reference `2.4b` shape (1 x 2,048), bf16, on the GPU

then prints a summary table (stage, status, seconds, result).

Short of the reference shapes today: decode_memory.py and train_throughput.py take no --device,
so they run on the GPU through a shim (CUDA_SHIM in --dry-run; a script's own --device is used
once it has one); continual_step.py reads a bank of ~250 references, not >= 100,000 (a bank that
size takes ~18 minutes to build on a CPU: bench/RESULTS.md, continual_step at the reference's
length).

OUT (default bench_runs/gpu_check) receives report.txt and one log per stage (<stage>.log):
six files. Checkpoints, banks and generated data go under --work (default OUT/work);
the benches' worlds and the train stage's data are kept there and reused by a rerun. On a lent
device machine, where only a few files come back:
    bench/gpu_check.sh "$OUT/gpu_check" --work /tmp/gpu_check

options:
  --work DIR            where the heavy files go (default: OUT/work)
  --only STAGES         run only these stages (comma-separated, or the option repeated)
  --dry-run             print the commands a run would take, with their time limits, and the
                        Python snippets they use; runs nothing, needs no GPU, writes nothing
  --time-limit SECONDS  the whole script's deadline (default 465); every stage also has its
                        own limit, shown by --dry-run
  --peak-flops FLOPS    one GPU's dense bf16 peak for MFU (default 989e12: H100/H200 SXM)
  --warmup-steps N      steps of the `small` warmup run (default 300)
  --continual-steps N   steps of the continual run (default 200)
  -h, --help            this text

Needs python3 (or $PYTHON) with a CUDA build of torch, triton, deepspeed, faiss, sentencepiece,
transformers and pytest; the repository is put on PYTHONPATH, so memory3 need not be installed.
A stage whose packages are missing is reported as skipped.

Exit status: 0 every stage ran and passed; 1 a stage failed, timed out or was skipped;
2 no CUDA GPU (said at once, nothing run or written); 64 bad usage.
EOF
}

# -- arguments -------------------------------------------------------------------------------
OUT=bench_runs/gpu_check
WORK=""
ONLY=()
DRY=0
TIME_LIMIT=465
PEAK_FLOPS=989e12
WARMUP_STEPS=300
CONTINUAL_STEPS=200
out_given=0

die_usage() { echo "gpu_check: $1 (see --help)" >&2; exit 64; }
need_value() { [[ $# -ge 2 && -n $2 ]] || die_usage "$1 needs a value"; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

while [[ $# -gt 0 ]]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --dry-run) DRY=1; shift ;;
        --work) need_value "$@"; WORK=$2; shift 2 ;;
        --only) need_value "$@"; IFS=, read -r -a more <<<"$2"; ONLY+=("${more[@]}"); shift 2 ;;
        --time-limit) need_value "$@"; is_uint "$2" || die_usage "--time-limit takes seconds"
                      TIME_LIMIT=$2; shift 2 ;;
        --peak-flops) need_value "$@"; [[ $2 =~ ^[0-9.]+([eE][0-9]+)?$ ]] \
                          || die_usage "--peak-flops takes a number such as 989e12"
                      PEAK_FLOPS=$2; shift 2 ;;
        --warmup-steps) need_value "$@"; is_uint "$2" && (( $2 > 0 )) \
                            || die_usage "--warmup-steps takes a positive integer"
                        WARMUP_STEPS=$2; shift 2 ;;
        --continual-steps) need_value "$@"; is_uint "$2" && (( $2 > 0 )) \
                               || die_usage "--continual-steps takes a positive integer"
                           CONTINUAL_STEPS=$2; shift 2 ;;
        -*) die_usage "unknown option $1" ;;
        *) (( out_given )) && die_usage "one output folder, got '$OUT' and '$1'"
           OUT=$1; out_given=1; shift ;;
    esac
done
for s in "${ONLY[@]}"; do
    [[ " ${STAGES[*]} " == *" $s "* ]] || die_usage "unknown stage '$s' (stages: ${STAGES[*]})"
done
selected() { [[ ${#ONLY[@]} -eq 0 || " ${ONLY[*]} " == *" $1 "* ]]; }

OUT=$(realpath -m -- "$OUT")
WORK=$(realpath -m -- "${WORK:-$OUT/work}")
cd "$REPO" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# -- Python snippets the commands run (printed by --dry-run) ---------------------------------
# MAKE_DATA ROOT PEOPLE FACTS_PER_DOC VOCAB: the generated world the benches use, as shards
# (tokenizer trained on it) and a knowledge base of FACTS_PER_DOC records per reference.
MAKE_DATA=$(cat <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from worlds import world_inputs
root, people, facts, vocab = Path(sys.argv[1]), *map(int, sys.argv[2:5])
_, knowledge, shards = world_inputs(root, people, facts, vocab)
print(f"world of {people} people: shards {shards}, knowledge {knowledge}")
EOF
)

# CUDA_SHIM SCRIPT ARGS...: a bench script that has no --device, run on the GPU.
# decode_memory.py loads its checkpoint with device="cpu": load it onto the GPU instead.
# train_throughput.py builds its models and batches on torch's default device: make that the GPU.
CUDA_SHIM=$(cat <<'EOF'
import os, runpy, sys
import torch
script = sys.argv[1]
if os.path.basename(script) == "train_throughput.py":
    torch.set_default_device("cuda")
else:
    import memory3.checkpoints
    import memory3.train.checkpoint
    load = memory3.checkpoints.load_model
    def load_on_cuda(path, device=None, **kw):
        return load(path, device="cuda", **kw)
    memory3.checkpoints.load_model = memory3.train.checkpoint.load_model = load_on_cuda
print(f"# gpu_check: {script} on {torch.cuda.get_device_name(0)} (CUDA shim)", flush=True)
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
EOF
)

# SUMMARY KIND ARGS...: one line, the result of a stage, read off its log or its runs' metrics.
SUMMARY=$(cat <<'EOF'
import json, re, statistics, sys
from pathlib import Path
kind, args = sys.argv[1], sys.argv[2:]
lines = [] if kind == "metrics" else Path(args[0]).read_text(errors="replace").splitlines()
out = []
if kind == "pytest":
    done = [l for l in lines if re.search(r"\d+ (passed|failed|error)", l)]
    out.append(done[-1].strip("= ") if done else "no pytest summary line")
elif kind == "metrics":  # RUN...: median tokens/s and MFU after step 10, peak memory, losses
    for run in map(Path, args):
        recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()
                if l.strip()] if (run / "metrics.jsonl").exists() else []
        train = [r for r in recs if r.get("kind") == "train"]
        evals = [r for r in recs if r.get("kind") == "eval"]
        if not train:
            out.append(f"{run.name}: no steps logged")
            continue
        steady = [r for r in train if r["step"] > 10] or train
        mfu = [r["mfu"] for r in steady if "mfu" in r]
        part = (f"{run.name} {train[-1]['step']} steps "
                f"{statistics.median(r['tokens_per_s'] for r in steady):,.0f} tok/s"
                + (f" MFU {100 * statistics.median(mfu):.2f}%" if mfu else "")
                + f" peak {max(r.get('peak_memory_gb', 0) for r in train):.2f} GB"
                + f" loss {train[0]['loss']:.2f}->{train[-1]['loss']:.2f}")
        if evals and "val_memory_gain" in evals[-1]:
            part += f" memory gain {evals[-1]['val_memory_gain']:+.4f}"
        out.append(part)
elif kind in ("decode", "continual"):  # tokens/s or s/step of each side, then the ratios
    row = {"decode": r"(none|memory|rag)\s+[\d.]+\s+[\d.]+\s+([\d.]+)$",
           "continual": r"(warmup|continual)\s+([\d.]+)\s"}[kind]
    unit = {"decode": "tok/s", "continual": "s/step"}[kind]
    for l in lines:
        m = re.match(row, l.strip())
        if m:
            out.append(f"{m[1]} {m[2]} {unit}")
        m = re.match(r"ratio (\S+)(?: \(tokens/s\))?: ([\d.]+x)", l)
        if m:
            out.append(f"{m[1]} {m[2]}")
elif kind == "throughput":  # LOG PEAK_FLOPS: ours and hf per shape; MFU ~ 6 N tokens/s / peak
    peak, head = float(args[1]), None
    for l in lines:
        m = re.match(r"# train_throughput: preset=(\S+) \(([\d.]+)M params\) batch=(\d+) "
                     r"seq_len=(\d+)", l)
        if m:
            head, n_params, tps = f"{m[1]} {m[3]}x{m[4]}", float(m[2]) * 1e6, {}
        m = re.match(r"(ours|hf)\s+[\d.]+\s+[\d.]+\s+(\d+)$", l.strip())
        if head and m:
            tps[m[1]] = float(m[2])
        m = re.match(r"ratio ours/hf \(tokens/s\): ([\d.]+x)", l)
        if head and m and len(tps) == 2:
            out.append(f"{head} ours {tps['ours']:,.0f} tok/s "
                       f"(MFU~{600 * n_params * tps['ours'] / peak:.1f}%) "
                       f"hf {tps['hf']:,.0f} ours/hf {m[1]}")
            head = None
print("; ".join(out))
EOF
)

# -- running commands ------------------------------------------------------------------------
SNIPPETS=(MAKE_DATA CUDA_SHIM SUMMARY)

show() {  # a command as one line of shell; a snippet by its name
    local arg name words=()
    for arg in "$@"; do
        for name in "${SNIPPETS[@]}"; do
            [[ $arg == "${!name}" ]] && { words+=("\"\$$name\""); continue 2; }
        done
        words+=("$(printf '%q' "$arg")")
    done
    echo "${words[*]}"
}

START=$(date +%s)
DEADLINE=$(( START + TIME_LIMIT ))

# run LOG LIMIT CMD...: CMD under `timeout` for at most LIMIT seconds (less if the deadline is
# nearer), its output appended to LOG. --dry-run prints it instead.
run() {
    local log=$1 limit=$2 rc left
    shift 2
    if (( DRY )); then
        echo "\$ $(show "$@")   # <= ${limit} s"
        return 0
    fi
    left=$(( DEADLINE - $(date +%s) ))
    (( limit > left )) && limit=$left
    echo "\$ $(show "$@")   # <= ${limit} s" >>"$log"
    if (( limit < 5 )); then
        echo "[gpu_check: not started, the ${TIME_LIMIT} s deadline is reached]" >>"$log"
        return 124
    fi
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1 </dev/null
    rc=$?
    if (( rc == 124 || rc == 137 )); then
        echo "[gpu_check: timed out after ${limit} s]" >>"$log"
    elif (( rc != 0 )); then
        echo "[gpu_check: exit status $rc]" >>"$log"
    fi
    return $rc
}

# A bench script on the GPU: with --device where the script has it, else through CUDA_SHIM.
on_gpu() {
    local log=$1 limit=$2 script=$3
    shift 3
    if grep -q -- '"--device"' "$script"; then
        run "$log" "$limit" "$PY" "$script" --device cuda "$@"
    else
        run "$log" "$limit" "$PY" -c "$CUDA_SHIM" "$script" "$@"
    fi
}

summary() {  # SUMMARY KIND ARGS...: result lines of a stage (nothing in a dry run)
    (( DRY )) || timeout 30 "$PY" -c "$SUMMARY" "$@" 2>/dev/null
}

declare -A STATUS SECONDS_TAKEN RESULT
fail() {  # fail STAGE WHAT RC: remember the first failure of a stage
    local what=$2
    (( $3 == 124 || $3 == 137 )) && what="$2 timed out" || what="$2 exit $3"
    [[ ${STATUS[$1]} == ok ]] && STATUS[$1]="FAILED ($what)"
}

has_modules() {  # has_modules STAGE MODULE...: else mark the stage skipped
    local missing=() m
    (( DRY )) && return 0
    for m in "${@:2}"; do
        [[ " $MISSING " == *" $m "* ]] && missing+=("$m")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    STATUS[$1]="skipped"
    RESULT[$1]="missing Python packages: ${missing[*]}"
    return 1
}

# -- stages ----------------------------------------------------------------------------------
stage_tests() {
    local log=$1
    has_modules tests triton pytest sentencepiece || return  # (conftest needs sentencepiece)
    run "$log" 50 env -u TRITON_INTERPRET "$PY" -m pytest -q -rs -p no:cacheprovider \
        tests/test_kernels.py || fail tests pytest $?
    RESULT[tests]=$(summary pytest "$log")
}

stage_train() {
    local log=$1 data=$WORK/cache/train-data runs=$WORK/train rc
    local launch=("$PY" -m deepspeed.launcher.runner --num_gpus 1)
    has_modules train deepspeed sentencepiece faiss || return
    if (( ! DRY )) && [[ -f $data/shards/manifest.json && -f $data/knowledge.jsonl ]]; then
        echo "[gpu_check: reusing the data in $data]" >>"$log"
    else
        run "$log" 35 "$PY" -c "$MAKE_DATA" "$data" 1000 4 8192 || { fail train data $?; return; }
    fi
    (( DRY )) || rm -rf -- "$runs"
    run "$log" 75 "${launch[@]}" --master_port 29641 --module memory3 train --recipe small-warmup \
        --out "$runs/warmup" --no-resume --no-progress "data.path=$data/shards" \
        "train.max_steps=$WARMUP_STEPS" \
        train.eval_every=100 train.save_every=100 "train.peak_flops=$PEAK_FLOPS"
    rc=$?
    (( rc )) && fail train warmup $rc  # a run cut short still leaves its checkpoints
    run "$log" 20 "$PY" -m memory3 build-bank --checkpoint "$runs/warmup" \
        --knowledge "$data/knowledge.jsonl" --out "$runs/bank" --batch-size 256 --no-progress
    rc=$?
    if (( rc )); then
        fail train bank $rc
    else
        run "$log" 65 "${launch[@]}" --master_port 29642 --module memory3 train \
            --recipe small-continual --out "$runs/continual" --no-resume --no-progress \
            "data.path=$data/shards" "continual.bank=$runs/bank" \
            "train.init_from=$runs/warmup" "train.max_steps=$CONTINUAL_STEPS" \
            train.eval_every=100 train.save_every=100 "train.peak_flops=$PEAK_FLOPS" \
            || fail train continual $?
    fi
    (( DRY )) && return
    RESULT[train]=$(summary metrics "$runs/warmup" "$runs/continual")
    if grep -qi "backend nccl" "$log"; then
        RESULT[train]="NCCL; ${RESULT[train]}"
    else
        RESULT[train]="no 'backend nccl' line in the log; ${RESULT[train]}"
    fi
}

stage_decode() {
    local log=$1
    has_modules decode deepspeed sentencepiece faiss || return
    on_gpu "$log" 80 bench/decode_memory.py --dtype bf16 --facts-per-doc 12 --max-seq-len 2048 \
        --new-tokens 960 --reps 2 --warmup 1 --threads 0 --entities 1000 \
        --cache "$WORK/cache/decode" || fail decode decode_memory $?
    RESULT[decode]=$(summary decode "$log")
}

stage_continual() {
    local log=$1
    has_modules continual deepspeed sentencepiece faiss || return
    run "$log" 70 "$PY" bench/continual_step.py --dtype bf16 --seq-len 2048 --batch 2 \
        --steps 10 --warmup 3 \
        --entities 1000 --facts-per-doc 4 --cache "$WORK/cache/continual_step" \
        || fail continual continual_step $?
    RESULT[continual]=$(summary continual "$log")
}

stage_throughput() {
    local log=$1
    has_modules throughput transformers || return
    on_gpu "$log" 25 bench/train_throughput.py --preset small --batch 8 --seq-len 512 \
        --dtype bf16 --steps 20 --warmup 5 || fail throughput small $?
    on_gpu "$log" 40 bench/train_throughput.py --preset 2.4b --batch 1 --seq-len 2048 \
        --dtype bf16 --steps 8 --warmup 3 || fail throughput 2.4b $?
    RESULT[throughput]=$(summary throughput "$log" "$PEAK_FLOPS")
}

# -- dry run ---------------------------------------------------------------------------------
if (( DRY )); then
    echo "# bench/gpu_check.sh --dry-run: the commands a run takes, in order; nothing is run"
    echo "# repository $REPO; output $OUT; work $WORK; deadline ${TIME_LIMIT} s"
    echo "# first: exit 2 unless \`$PY -c 'import torch'\` sees a CUDA GPU"
    for stage in "${STAGES[@]}"; do
        selected "$stage" || continue
        echo "## stage $stage"
        STATUS[$stage]=ok
        "stage_$stage" /dev/null
    done
    for name in "${SNIPPETS[@]}"; do
        echo "## snippet $name"
        sed 's/^/#   /' <<<"${!name}"
    done
    exit 0
fi

# -- a GPU, or exit 2 at once ----------------------------------------------------------------
GPU_PY=$(cat <<'EOF'
import sys, torch
where = f"torch {torch.__version__} (CUDA {torch.version.cuda})"
if not torch.cuda.is_available():
    print(f"{where} sees no CUDA GPU")
    sys.exit(2)
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {where}")
EOF
)
if ! gpu=$("$PY" -c "$GPU_PY" 2>&1); then
    echo "gpu_check: no CUDA GPU: ${gpu##*$'\n'}" >&2
    echo "gpu_check: nothing was run; this check needs one CUDA GPU" \
         "(--dry-run lists its commands)" >&2
    exit 2
fi

mkdir -p -- "$OUT" "$WORK"
REPORT=$OUT/report.txt
MISSING=$("$PY" -c 'import importlib.util
print(" ".join(m for m in ("triton", "pytest", "deepspeed", "sentencepiece", "faiss",
                           "transformers", "memory3") if importlib.util.find_spec(m) is None))')
VERSIONS=$("$PY" -c 'from importlib import metadata
def v(d):
    try:
        return metadata.version(d)
    except metadata.PackageNotFoundError:
        return "-"
print(", ".join(f"{d} {v(d)}" for d in ("triton", "deepspeed", "transformers", "faiss-cpu")))')

{
    echo "# memory3 GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')," \
         "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "# $gpu; $VERSIONS"
    [[ -n $MISSING ]] && echo "# missing Python packages: $MISSING"
    echo "# logs in $OUT, work files in $WORK"
} | tee "$REPORT"

for stage in "${STAGES[@]}"; do
    selected "$stage" || continue
    log=$OUT/$stage.log
    : >"$log"
    echo "[gpu_check] $stage ..."
    STATUS[$stage]=ok
    RESULT[$stage]=""
    t0=$(date +%s)
    "stage_$stage" "$log"
    SECONDS_TAKEN[$stage]=$(( $(date +%s) - t0 ))
    if [[ ${STATUS[$stage]} == FAILED* ]]; then  # and the last line its commands printed
        last=$(grep -v -e '^\[gpu_check' -e '^\s*$' "$log" | tail -n 1 | cut -c1-120)
        RESULT[$stage]="${RESULT[$stage]:+${RESULT[$stage]} | }log: $last"
    fi
    echo "[gpu_check] $stage: ${STATUS[$stage]} in ${SECONDS_TAKEN[$stage]} s"
done

{
    echo
    printf '%-11s %-28s %7s  %s\n' stage status seconds result
    for stage in "${STAGES[@]}"; do
        selected "$stage" || continue
        printf '%-11s %-28s %7s  %s\n' "$stage" "${STATUS[$stage]}" "${SECONDS_TAKEN[$stage]:--}" \
            "${RESULT[$stage]}"
    done
    printf '%-11s %-28s %7s\n' total "" "$(( $(date +%s) - START ))"
} | tee -a "$REPORT"
echo "report: $REPORT"
for stage in "${STAGES[@]}"; do
    selected "$stage" && [[ ${STATUS[$stage]} != ok ]] && exit 1
done
exit 0
