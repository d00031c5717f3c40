"""Behaviour unchanged: re-evaluate a run's checkpoints with this version and compare with a reference results.json.

    python bench/check_unchanged.py --run runs/smoke --reference REF/results.json [--overrides experiment=smoke]

Copies the run's lm.ckpt, fisher.pt and meta*.ckpt (not tuned.json: the baselines are tuned again) into a scratch
run directory, runs `python evaluate.py` there as a user would, and compares every split's every method's
perplexity with the reference's (relative tolerance --rtol). Prints one row per (split, method); exits 1 when a
perplexity differs or a method is missing, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ("lm.ckpt", "fisher.pt", "meta.ckpt", "meta_noflush.ckpt")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="run directory holding the checkpoints")
    ap.add_argument("--reference", type=Path, required=True, help="results.json the checkpoints gave before")
    ap.add_argument("--overrides", nargs="*", default=["experiment=smoke"], help="evaluate.py overrides")
    ap.add_argument("--rtol", type=float, default=1e-5)
    a = ap.parse_args()
    ref = json.loads(a.reference.read_text())
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        for name in ARTIFACTS:
            if (a.run / name).is_file():
                shutil.copy(a.run / name, Path(tmp) / name)
        cmd = [sys.executable, "evaluate.py", *a.overrides, f"paths.run_dir={tmp}", "logger=none",
               "trainer.enable_progress_bar=false"]
        print(" ".join(cmd[1:]), flush=True)
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)
            return 1
        new = json.loads((Path(tmp) / "results.json").read_text())
    bad = 0
    print("| split | method | ppl before | ppl after | rel. diff |\n|---|---|---|---|---|")
    for split, methods in ref["splits"].items():
        for m, r in methods.items():
            after = new["splits"].get(split, {}).get(m, {}).get("ppl")
            rel = abs(after - r["ppl"]) / r["ppl"] if after is not None else float("inf")
            bad += rel > a.rtol
            print(f"| {split} | {m} | {r['ppl']:.6f} | {after if after is None else f'{after:.6f}'} | {rel:.1e} |")
    print(f"{'FAIL' if bad else 'OK'}: {bad} of the reference's perplexities differ by more than {a.rtol:g}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
