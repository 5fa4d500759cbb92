# Job queues for one device call: source it, queue jobs per GPU against one deadline, pack.
#
#   DEADLINE=530 . bench/jobs.sh          # seconds this call may spend on jobs
#   ( export CUDA_VISIBLE_DEVICES=0; job decode 480 python3 bench/bench_decode.py ... ) &
#   ( export CUDA_VISIBLE_DEVICES=1; job train 330 python3 bench/bench_train.py ...;
#     job tests 300 python3 -m pytest tests/kernels -m gpu -q ) &
#   wait; pack                            # $OUT/results.tgz: every log, JSON and summary.txt
#
# Each job runs with a timeout of min(its cap, what is left of DEADLINE) and is skipped when
# less than 45 s are left; its output goes to $R/NAME.log and a line per job to $R/summary.txt.
# Jobs write their JSON under $R too. One tarball comes back however many files there are (the
# device tool returns at most 8 files).
export PYTHONPATH=. PYTHONUNBUFFERED=1
# Keep NVLink multicast off on multi-GPU machines (KINDS.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=$OUT/r
mkdir -p "$R"
T0=$(date +%s)

job() {
  local name=$1 cap=$2
  shift 2
  local left=$(( ${DEADLINE:-530} - ($(date +%s) - T0) - 10 ))
  local t=$(( cap < left ? cap : left ))
  if [ "$left" -lt 45 ]; then
    echo "SKIP $name (only ${left}s left)" | tee -a "$R/summary.txt"
    return
  fi
  local s
  s=$(date +%s)
  timeout --signal=INT --kill-after=15 "$t" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s ))s (limit $t) gpu=${CUDA_VISIBLE_DEVICES:-all}" \
    | tee -a "$R/summary.txt"
}

pack() {
  nvidia-smi -L >> "$R/summary.txt" 2>&1
  tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$R"
}
