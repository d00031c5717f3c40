#!/bin/bash
# gate=krause_fast (transcendental-free residual around Krause) on the stage=all checkpoint, with and without
# FLUSH, 20 meta-steps each like the reference rows; then both evaluated side by side.
cd /work/main && . .venv/bin/activate
export OMP_NUM_THREADS=1 DYNLM_DATA=/work/shared/data/wikitext-2
SRC=/work/wt_all/runs/cpu_all
name=cpu_all_fast
mkdir -p runs/$name && cp $SRC/tuned.json runs/$name/
for v in meta meta_noflush; do
  s=$(date +%s)
  over=(); [ $v = meta_noflush ] && over=(gate.flush=false)
  python train.py experiment=cpu stage=meta from_run=$SRC name=$name gate=krause_fast "${over[@]}" \
    > /work/abl/$name.$v.log 2>&1 || echo "FAIL $v"
  echo "=== $v meta-stage $(( $(date +%s) - s ))s"; tail -1 /work/abl/$name.$v.log
done
s=$(date +%s)
python evaluate.py experiment=cpu name=$name gate=krause_fast eval.methods=[meta_noflush,meta] > /work/abl/$name.eval.log 2>&1 || echo "FAIL eval"
echo "=== eval $(( $(date +%s) - s ))s"
grep -B2 -A8 "| method" runs/$name/results.md
echo ALLDONE $(date +%T)
