#!/usr/bin/env bash
# The paper's base-to-novel table, end to end, over datasets and seeds:
#   teacher (PromptSRC, ViT-L/14, 16 base shots) -> class vectors (once) -> student (ViT-B/16, unlabelled)
#   -> evaluation of zero-shot CLIP ViT-B/16, teacher and student -> one report over everything.
# Re-running it skips finished steps and resumes interrupted ones.
#
#   bash scripts/reproduce_base2novel.sh DATA_ROOT ViT-L-14.pt ViT-B-16.pt
#   DATASETS="dtd eurosat" SEEDS="1" OUT=runs/b2n bash scripts/reproduce_base2novel.sh ...
# Environment: DATASETS, SEEDS (default 1 2 3), OUT (default runs/base2novel), PROMPTKD (the command),
# TEACHER_SET / STUDENT_SET (extra "--set k=v" arguments for every teacher / student run).
set -euo pipefail
if [ $# -ne 3 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
DATA=$1 TEACHER_CLIP=$2 STUDENT_CLIP=$3
DATASETS=${DATASETS:-"imagenet caltech101 oxfordpets stanfordcars flowers102 food101 fgvcaircraft sun397 dtd eurosat ucf101"}
SEEDS=${SEEDS:-"1 2 3"}
OUT=${OUT:-runs/base2novel}
PK=${PROMPTKD:-promptkd}
read -r -a TSET <<< "${TEACHER_SET:-}"
read -r -a SSET <<< "${STUDENT_SET:-}"

resume_flag() { [ -d "$1/checkpoints" ] && echo --resume || true; }

for d in $DATASETS; do
  for s in $SEEDS; do
    run="$OUT/$d/seed$s"
    echo "== $d seed $s -> $run"
    if [ ! -f "$run/teacher/adapter.json" ]; then
      # shellcheck disable=SC2046
      $PK train-teacher --config teacher/base2novel --data-root "$DATA" --dataset "$d" \
        --clip-weights "$TEACHER_CLIP" --out "$run/teacher" --seed "$s" $(resume_flag "$run/teacher") "${TSET[@]}"
    fi
    if [ ! -f "$run/class_vectors.safetensors" ]; then
      $PK class-vectors --teacher "$run/teacher" --dataset "$d" --data-root "$DATA" \
        --out "$run/class_vectors.safetensors"
    fi
    if [ ! -f "$run/student/adapter.json" ]; then
      # shellcheck disable=SC2046
      $PK distill --config "distill/base2novel/$d" --data-root "$DATA" --teacher "$run/teacher" \
        --class-vectors "$run/class_vectors.safetensors" --student-weights "$STUDENT_CLIP" \
        --out "$run/student" --seed "$s" $(resume_flag "$run/student") "${SSET[@]}"
    fi
    common=(--data-root "$DATA" --dataset "$d" --protocol base2novel --seed "$s")
    [ -f "$run/eval_zeroshot/results.json" ] || \
      $PK evaluate --model zeroshot --clip-weights "$STUDENT_CLIP" "${common[@]}" --out "$run/eval_zeroshot"
    [ -f "$run/eval_teacher/results.json" ] || \
      $PK evaluate --model teacher --artefact "$run/teacher" "${common[@]}" --out "$run/eval_teacher"
    [ -f "$run/eval_student/results.json" ] || \
      $PK evaluate --model student --artefact "$run/student" "${common[@]}" --out "$run/eval_student"
  done
done
$PK report "$OUT" --out "$OUT/report"
echo "tables: $OUT/report/report.md, $OUT/report/report.csv; plot: $OUT/report/report_base2novel.png"
