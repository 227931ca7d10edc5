#!/usr/bin/env bash
# Kather ResNet-8 distillation on CPU: teacher, student alone, vanilla KD, multi-part KD, all
# compared on the same unseen tiles. Prints the table and the wall time of every step.
#
#   benchmarks/kather_kd.sh ../shared/data/kather2016 runs/kather_kd [SEED]
set -euo pipefail
data=${1:?usage: kather_kd.sh KATHER_DIR OUT [SEED]}
out=${2:?usage: kather_kd.sh KATHER_DIR OUT [SEED]}
seed=${3:-42}
histolite=${HISTOLITE:-histolite}
python=${PYTHON:-python}
mkdir -p "$out"
log="$out/timings.txt"
: > "$log"

step() {  # step NAME COMMAND...
  local name=$1; shift
  local started=$SECONDS
  "$@"
  echo "$name: $((SECONDS - started)) s" | tee -a "$log"
}

"$python" benchmarks/kather_holdout.py --data "$data" --out "$out/folders" --seed 0
common=(--set "data.root=$out/folders/train" --set "seed=$seed" --no-progress)
step teacher "$histolite" train configs/kather2016_resnet18_teacher.yaml "${common[@]}" \
  --out "$out/teacher"
step student_alone "$histolite" train configs/kather2016_resnet8_kd.yaml "${common[@]}" \
  --out "$out/student_alone"
step student_kd "$histolite" distill configs/kather2016_resnet8_kd.yaml "${common[@]}" \
  --teacher "$out/teacher" --out "$out/student_kd"
step student_multipart_kd "$histolite" distill configs/kather2016_resnet8_multipart.yaml \
  "${common[@]}" --teacher "$out/teacher" --out "$out/student_multipart_kd"
"$histolite" compare "$out/teacher" "$out/student_alone" "$out/student_kd" \
  "$out/student_multipart_kd" --data "$out/folders/test" --out "$out/compare"
cat "$log"
