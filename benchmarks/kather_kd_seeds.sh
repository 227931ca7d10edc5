#!/usr/bin/env bash
# Several seeds of the Kather ResNet-8 distillation arms at a short budget, after
# benchmarks/kather_kd.sh has trained the teacher (OUT/teacher) and made OUT/folders.
#
#   benchmarks/kather_kd_seeds.sh runs/kather_kd EPOCHS SEED...
#
# For every seed: ResNet-8 alone, vanilla KD and multi-part KD, each for EPOCHS epochs, each
# evaluated on the same unseen tiles (OUT/folders/test). Prints one line per run and a summary.
set -euo pipefail
out=${1:?usage: kather_kd_seeds.sh OUT EPOCHS SEED...}
epochs=${2:?usage: kather_kd_seeds.sh OUT EPOCHS SEED...}
shift 2
histolite=${HISTOLITE:-histolite}
python=${PYTHON:-python}
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
  run_arm alone "$seed" "$histolite" train configs/kather2016_resnet8_kd.yaml
  run_arm vanilla_kd "$seed" "$histolite" distill configs/kather2016_resnet8_kd.yaml \
    --teacher "$out/teacher"
  run_arm multipart_kd "$seed" "$histolite" distill configs/kather2016_resnet8_multipart.yaml \
    --teacher "$out/teacher"
done

"$python" - "$results" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
for arm in ("alone", "vanilla_kd", "multipart_kd"):
    acc = [float(r["accuracy"]) for r in rows if r["arm"] == arm]
    if acc:
        sd = statistics.stdev(acc) if len(acc) > 1 else float("nan")
        print(f"{arm:>13}: mean accuracy {statistics.mean(acc):.4f} (sd {sd:.4f}, n={len(acc)})"
              f"  per seed: {', '.join(f'{a:.4f}' for a in acc)}")
# paired by seed: both arms share the seed's initialisation and batch order
by_seed = {(r["arm"], r["seed"]): float(r["accuracy"]) for r in rows}
for arm, base in (("vanilla_kd", "alone"), ("multipart_kd", "alone"), ("multipart_kd", "vanilla_kd")):
    diffs = [by_seed[arm, s] - by_seed[base, s] for a, s in by_seed if a == arm and (base, s) in by_seed]
    if diffs:
        sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        print(f"{arm} - {base}: mean {statistics.mean(diffs):+.4f} (sd {sd:.4f}, n={len(diffs)})"
              f"  per seed: {', '.join(f'{d:+.4f}' for d in diffs)}")
PY
