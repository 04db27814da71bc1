#!/usr/bin/env bash
# Run every table of toy/RESULTS.md that depends on the toy checkpoint, for a candidate checkpoint: what
# adopting a checkpoint needs (issue 20: "re-adopt the checkpoint only with all tables re-run").
#
# Usage: bash scripts/tables.sh WEIGHTS OUT_DIR [JOBS]
#   WEIGHTS  the candidate's .safetensors (toy/model.py layout)
#   OUT_DIR  where the results go (created): see the list below
#   JOBS     processes at once, one CPU thread each (default: the number of CPU cores)
#   TABLES_SMOKE=1 (environment): one item per half-split and a few samples per quality run, to check the
#   script end to end in minutes (the numbers mean nothing); TABLES_DRY=1: write the jobs (OUT_DIR/parts/job_*.sh)
#   and print them, run nothing
#
# Writes, in OUT_DIR:
#   quality_classes.txt      toy.quality --all-prompts --per-class --per-prompt 8 (colour / shape / background classes)
#   quality_two_objects.txt  toy.quality --two-objects 48 --per-prompt 8 (two-object shapes)
#   test_drawn.json, dev_drawn.json   toy.quality --split test|dev --per-prompt 16 (is each item's edit prompt drawn)
#   test_split.json          toy.benchmark --split test, every row of toy/results/test_split.json (4 frames)
#   dev_split.json           toy.benchmark --split dev, every row of toy/results/dev_split.json (4 frames)
#   public.json              toy.benchmark (the six public items, every row, 8 frames)
#   *.txt                    each job's printed tables; compare.txt: the splits paired against the committed results
#   frames/test, frames/dev  every edited clip of the splits (uint8 .npz): `toy.benchmark --split S --rescore DIR`
#                            scores them again with changed metrics without running the rows again
# The benchmark splits run in halves (items) so that JOBS processes share them; the halves are joined with --merge.
# CPU time on this project's machines (committed checkpoint, one thread per job): about 80 minutes for the test
# split (47 of them Video-P2P (null-text)), 35 for the dev split, 35 for the quality runs.
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,20p "$0"; exit 2; }
W=$(realpath "$1"); OUT=$(realpath -m "$2"); JOBS=${3:-$(nproc)}
[ -f "$W" ] || { echo "tables.sh: no checkpoint at $W" >&2; exit 2; }
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT/parts"
RUN="bash scripts/run.sh -m"

rows() {  # the rows of a committed results file, comma separated (labels with commas are matched whole)
  python3 -c "import json,sys; print(','.join(json.load(open(sys.argv[1]))))" "$1"
}
items() {  # half $2 (0 or 1) of the items of split $1 (every other item: each half has every edit kind)
  printf '%s\n' "$SPLITS" | awk -v s="$1" -v h="$2" '$1 == s && (++i) % 2 != h {print $2}' | head -n "$PER_HALF" |
    paste -sd, -
}
SPLITS=$(bash scripts/run.sh -c "import toy.scenes as sc
for s in ('test', 'dev'):
    for x in sc.split_set(s, 2): print(s, x.name)")
SMOKE=${TABLES_SMOKE:-0}
if [ "$SMOKE" = 1 ]; then PER_HALF=1 Q8=1 Q16=1 TWO=4 PUBLIC="--items color_swap"; else PER_HALF=1000 Q8=8 Q16=16 TWO=48 PUBLIC=""; fi
TEST_ROWS=$(rows toy/results/test_split.json)
DEV_ROWS=$(rows toy/results/dev_split.json)
NULL_TEXT="Video-P2P (null-text)"
TEST_FAST=$(printf '%s' "$TEST_ROWS" | python3 -c "import sys; print(','.join(r for r in sys.stdin.read().split(',') if r != '$NULL_TEXT'))")

rm -f "$OUT"/parts/job_*.sh
n=0
job() { n=$((n + 1)); printf '%s\n' "$*" > "$OUT/parts/job_$(printf %02d $n).sh"; }
for h in 0 1; do  # the longest first: null-text, then the splits' halves
  job "$RUN toy.benchmark --weights '$W' --split test --items '$(items test $h)' --frames 4 --methods '$NULL_TEXT' --frames-dir '$OUT/frames/test' --json '$OUT/parts/test_nt$h.json' > '$OUT/parts/test_nt$h.txt' 2>&1"
done
for h in 0 1; do
  job "$RUN toy.benchmark --weights '$W' --split test --items '$(items test $h)' --frames 4 --methods '$TEST_FAST' --frames-dir '$OUT/frames/test' --json '$OUT/parts/test$h.json' > '$OUT/parts/test$h.txt' 2>&1"
  job "$RUN toy.benchmark --weights '$W' --split dev --items '$(items dev $h)' --frames 4 --methods '$DEV_ROWS' --frames-dir '$OUT/frames/dev' --json '$OUT/parts/dev$h.json' > '$OUT/parts/dev$h.txt' 2>&1"
done
job "$RUN toy.benchmark --weights '$W' $PUBLIC --json '$OUT/public.json' > '$OUT/public.txt' 2>&1"
job "$RUN toy.quality --weights '$W' --all-prompts --per-class --per-prompt $Q8 > '$OUT/quality_classes.txt' 2>&1"
job "$RUN toy.quality --weights '$W' --two-objects $TWO --per-prompt $Q8 > '$OUT/quality_two_objects.txt' 2>&1"
job "$RUN toy.quality --weights '$W' --split test --per-prompt $Q16 --json '$OUT/test_drawn.json' > '$OUT/test_drawn.txt' 2>&1"
job "$RUN toy.quality --weights '$W' --split dev --per-prompt $Q16 --json '$OUT/dev_drawn.json' > '$OUT/dev_drawn.txt' 2>&1"

if [ "${TABLES_DRY:-0}" = 1 ]; then cat "$OUT"/parts/job_*.sh; exit 0; fi
echo "tables.sh: $n jobs, $JOBS at a time, into $OUT ($(date))"
failed=0
printf '%s\0' "$OUT"/parts/job_*.sh | xargs -0 -n 1 -P "$JOBS" sh -c 'bash "$0" || { echo "tables.sh: failed: $(cat "$0")" >&2; exit 1; }' || failed=1
$RUN toy.benchmark --split test --frames 4 --merge "$OUT"/parts/test0.json "$OUT"/parts/test1.json \
  "$OUT"/parts/test_nt0.json "$OUT"/parts/test_nt1.json --json "$OUT/test_split.json" > /dev/null 2>&1 || failed=1
python3 - "$OUT/test_split.json" toy/results/test_split.json <<'PY' || failed=1
import json, sys  # the rows in the committed file's order (null-text ran apart)
new, order = json.load(open(sys.argv[1])), list(json.load(open(sys.argv[2])))
keys = [r for r in order if r in new] + [r for r in new if r not in order]
json.dump({r: new[r] for r in keys}, open(sys.argv[1], "w"), indent=1)
PY
$RUN toy.benchmark --split test --frames 4 --merge "$OUT/test_split.json" --drawn "$OUT/test_drawn.json" \
  > "$OUT/test_split.txt" 2>&1 || failed=1
$RUN toy.benchmark --split dev --frames 4 --merge "$OUT"/parts/dev0.json "$OUT"/parts/dev1.json \
  --json "$OUT/dev_split.json" > "$OUT/dev_split.txt" 2>&1 || failed=1
{
  $RUN toy.benchmark --split test --compare toy/results/test_split.json "$OUT/test_split.json"
  $RUN toy.benchmark --split dev --compare toy/results/dev_split.json "$OUT/dev_split.json"
} > "$OUT/compare.txt" 2>&1 || failed=1
echo "tables.sh: done ($(date)); $([ $failed = 0 ] && echo 'every job ran' || echo 'SOME JOBS FAILED: see the .txt files')"
exit $failed
