#!/usr/bin/env bash
# The paper's base-to-novel table, end to end, over datasets and seeds:
#   teacher (PromptSRC, ViT-L/14, 16 base shots) -> class vectors (once) -> student (ViT-B/16, unlabelled)
#   -> evaluation of zero-shot CLIP ViT-B/16, teacher and student -> one report over everything.
# As the authors: ONE teacher per dataset (seed TEACHER_SEED), reused by the students of every seed.
# Re-running it skips finished steps (made with the same settings) and resumes interrupted ones.
#
#   bash scripts/reproduce_base2novel.sh DATA_ROOT ViT-L-14.safetensors ViT-B-16.safetensors
#   DATASETS="dtd eurosat" SEEDS="1" OUT=runs/b2n bash scripts/reproduce_base2novel.sh ...
# Environment: DATASETS, SEEDS (default 1 2 3), OUT (default runs/base2novel), TEACHER_SEED (default 1),
# TEACHER_PER_SEED=1 (a teacher per seed instead), PROMPTKD (the command; default: promptkd on PATH, else
# this checkout's .venv/bin/promptkd), TEACHER_SET / STUDENT_SET (extra "--set k=v" for every teacher / student).
set -euo pipefail
if [ $# -ne 3 ]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
DATA=$1 TEACHER_CLIP=$2 STUDENT_CLIP=$3
DATASETS=${DATASETS:-"imagenet caltech101 oxfordpets stanfordcars flowers102 food101 fgvcaircraft sun397 dtd eurosat ucf101"}
SEEDS=${SEEDS:-"1 2 3"}
OUT=${OUT:-runs/base2novel}
TEACHER_SEED=${TEACHER_SEED:-1}
TEACHER_PER_SEED=${TEACHER_PER_SEED:-0}
here=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${PROMPTKD:-}" ]; then PK=$PROMPTKD
elif command -v promptkd >/dev/null 2>&1; then PK=promptkd
elif [ -x "$here/.venv/bin/promptkd" ]; then PK="$here/.venv/bin/promptkd"
else echo "promptkd not found: run 'bash scripts/setup.sh' (or set PROMPTKD=/path/to/promptkd)" >&2; exit 2
fi
read -r -a TSET <<< "${TEACHER_SET:-}"
read -r -a SSET <<< "${STUDENT_SET:-}"

# A finished step is skipped only if it was made with the same settings: each run's settings are noted in
# NAME.settings beside it, and a re-run with others stops instead of mixing two experiments in one table.
same_settings() {  # $1 run folder, $2 settings in words
  local note="$1.settings"
  if [ -f "$note" ] && [ "$(cat "$note")" != "$2" ]; then
    echo "$1 was made with other settings ($(cat "$note")), not ($2): use another OUT, or delete $1 to redo it" >&2
    exit 2
  fi
}
note_settings() { printf '%s' "$2" > "$1.settings"; }

# --resume continues an interrupted run and starts a fresh one in an empty folder
teacher_and_vectors() {  # $1 dataset, $2 folder, $3 seed
  same_settings "$2/teacher" "seed=$3 ${TEACHER_SET:-}"
  if [ ! -f "$2/teacher/adapter.json" ]; then
    $PK train-teacher --config teacher/base2novel --data-root "$DATA" --dataset "$1" \
      --clip-weights "$TEACHER_CLIP" --out "$2/teacher" --seed "$3" --resume "${TSET[@]}"
  fi
  note_settings "$2/teacher" "seed=$3 ${TEACHER_SET:-}"
  if [ ! -f "$2/class_vectors.safetensors" ]; then
    $PK class-vectors --teacher "$2/teacher" --dataset "$1" --data-root "$DATA" --out "$2/class_vectors.safetensors"
  fi
  [ -f "$2/eval_teacher/results.json" ] || $PK evaluate --model teacher --artefact "$2/teacher" \
    --data-root "$DATA" --dataset "$1" --protocol base2novel --seed "$3" --out "$2/eval_teacher"
}

for d in $DATASETS; do
  shared="$OUT/$d"
  [ "$TEACHER_PER_SEED" = 1 ] || { echo "== $d teacher (seed $TEACHER_SEED) -> $shared"; teacher_and_vectors "$d" "$shared" "$TEACHER_SEED"; }
  for s in $SEEDS; do
    run="$OUT/$d/seed$s"
    echo "== $d seed $s -> $run"
    t="$shared"
    if [ "$TEACHER_PER_SEED" = 1 ]; then t="$run"; teacher_and_vectors "$d" "$run" "$s"; fi
    same_settings "$run/student" "teacher=$t/teacher ${STUDENT_SET:-}"
    if [ ! -f "$run/student/adapter.json" ]; then
      $PK distill --config "distill/base2novel/$d" --data-root "$DATA" --teacher "$t/teacher" \
        --class-vectors "$t/class_vectors.safetensors" --student-weights "$STUDENT_CLIP" \
        --out "$run/student" --seed "$s" --resume "${SSET[@]}"
    fi
    note_settings "$run/student" "teacher=$t/teacher ${STUDENT_SET:-}"
    common=(--data-root "$DATA" --dataset "$d" --protocol base2novel --seed "$s")
    [ -f "$run/eval_zeroshot/results.json" ] || \
      $PK evaluate --model zeroshot --clip-weights "$STUDENT_CLIP" "${common[@]}" --out "$run/eval_zeroshot"
    [ -f "$run/eval_student/results.json" ] || \
      $PK evaluate --model student --artefact "$run/student" "${common[@]}" --out "$run/eval_student"
  done
done
$PK report "$OUT" --out "$OUT/report"
echo "tables: $OUT/report/report.md, $OUT/report/report.csv; plot: $OUT/report/report_base2novel.png"
