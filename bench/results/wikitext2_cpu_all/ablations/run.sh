#!/bin/bash
# Ablations on the stage=all checkpoint (runs/cpu_all), 20 meta-steps each as the reference row.
cd /work/main && . .venv/bin/activate
export OMP_NUM_THREADS=1 DYNLM_DATA=/work/shared/data/wikitext-2
SRC=/work/wt_all/runs/cpu_all
run() { name=$1; shift
  mkdir -p runs/$name && cp $SRC/tuned.json runs/$name/
  echo "=== $name $* $(date +%T)"
  s=$(date +%s)
  python train.py experiment=cpu stage=meta from_run=$SRC name=$name "$@" > /work/abl/$name.meta.log 2>&1 || echo "FAIL meta $name"
  m=$(date +%s)
  python evaluate.py experiment=cpu name=$name eval.methods=[meta] > /work/abl/$name.eval.log 2>&1 || echo "FAIL eval $name"
  e=$(date +%s)
  echo "=== $name meta $((m-s))s eval $((e-m))s"
  grep -A12 "| method" runs/$name/results.md | head -8
}
run cpu_all_unroll10 unroll=10
run cpu_all_nofisher 'gate.features=[theta,delta,grad,loss,rms]'
run cpu_all_paper gate=paper
run cpu_all_unroll40 unroll=40
run cpu_all_order2 meta.order=2
echo ALLDONE $(date +%T)
