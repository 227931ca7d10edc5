#!/usr/bin/env bash
# Several seeds of the Kather ResNet-8 distillation arms at one budget, after
# benchmarks/kather_kd.sh has trained a teacher (OUT/teacher) and made OUT/folders.
#
#   benchmarks/kather_kd_seeds.sh OUT EPOCHS SEED...
#
# For every seed: ResNet-8 alone, vanilla KD and multi-part KD, each for EPOCHS epochs, each
# evaluated on the same unseen tiles (OUT/folders/test). Prints one line per run, then a summary
# with the seed-paired differences between arms.
#   TEACHER=DIR  another teacher run (default OUT/teacher)
#   TAG=NAME     suffix for the KD arms' names, to keep teachers apart (e.g. _snapshot)
#   ARMS="..."   a subset of: alone vanilla_kd multipart_kd
set -euo pipefail
out=${1:?usage: kather_kd_seeds.sh OUT EPOCHS SEED...}
epochs=${2:?usage: kather_kd_seeds.sh OUT EPOCHS SEED...}
shift 2
histolite=${HISTOLITE:-histolite}
python=${PYTHON:-python}
teacher=${TEACHER:-$out/teacher}
tag=${TAG:-}
arms=${ARMS:-alone vanilla_kd multipart_kd}
results="$out/seeds_e${epochs}.csv"
[ -f "$results" ] || echo "arm,seed,epochs,accuracy,balanced_accuracy,macro_f1,seconds" > "$results"

run_arm() {  # run_arm ARM SEED COMMAND...
  local arm=$1 seed=$2; shift 2
  local dir="$out/e${epochs}_s${seed}_${arm}"
  if [ ! -f "$dir/holdout/report.json" ]; then
    local started=$SECONDS
    "$@" --set "data.root=$out/folders/train" --set "seed=$seed" \
      --set "trainer.max_epochs=$epochs" --no-progress --out "$dir"
    "$histolite" evaluate "$dir" --data "$out/folders/test" --out "$dir/holdout" > /dev/null
    "$python" - "$dir/holdout/report.json" "$arm" "$seed" "$epochs" "$((SECONDS - started))" \
      >> "$results" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(",".join([*sys.argv[2:5], f"{r['accuracy']:.4f}", f"{r['balanced_accuracy']:.4f}",
                f"{r['macro_f1']:.4f}", sys.argv[5]]))
PY
    tail -1 "$results"
  fi
}

for seed in "$@"; do
  for arm in $arms; do
    case $arm in
      alone) run_arm alone "$seed" "$histolite" train configs/kather2016_resnet8_kd.yaml ;;
      vanilla_kd) run_arm "vanilla_kd$tag" "$seed" "$histolite" distill \
        configs/kather2016_resnet8_kd.yaml --teacher "$teacher" ;;
      multipart_kd) run_arm "multipart_kd$tag" "$seed" "$histolite" distill \
        configs/kather2016_resnet8_multipart.yaml --teacher "$teacher" ;;
      *) echo "unknown arm $arm (alone, vanilla_kd, multipart_kd)" >&2; exit 2 ;;
    esac
  done
done

"$python" benchmarks/seed_summary.py "$results"
