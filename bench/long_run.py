"""Long-run stability of a trained meta-learner: ≥ 10,000 updates in one stream, no reset.

    python train.py experiment=smoke stage=all          # makes runs/smoke/{lm.ckpt,fisher.pt,meta.ckpt}
    python bench/long_run.py --run runs/smoke --updates 10000
    python bench/long_run.py --run runs/cpu --experiment cpu --split test --segment 20 --rules meta --fused

Without --split: the run's corpus (all three splits, repeated until the stream is long enough); with it: that
split whole, once. Adapts with the run's meta.ckpt (and the tuned rms rule from tuned.json, for comparison)
under Krause's protocol with the experiment's eval.max_drift trust region (--max-drift to change it, 0: off),
and records ‖θ_t − θ_0‖ after every update. Writes bench/results/long_run_<run>[_<split>].{md,png}. Fails
(exit 1) if any loss or weight becomes inf/NaN. Not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from hydra import compose, initialize_config_dir

from dynlm_pl.artifacts import load_fisher_optional, load_lm, load_meta_for
from dynlm_pl.cli import keep_freed_memory
from dynlm_pl.files import file_sha256
from dynlm_pl.meta.rules import RecordingGateRule, build_rule
from dynlm_pl.meta.scoring import method_losses
from dynlm_pl.meta.weights import DynamicWeights
from dynlm_pl.runtime import make_datamodule

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "smoke")
    ap.add_argument("--experiment", default="smoke")
    ap.add_argument("--updates", type=int, default=10_000)
    ap.add_argument("--segment", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--split", choices=["train", "valid", "test"], help="read this split once, whole")
    ap.add_argument("--rules", nargs="+", default=["meta", "rms"], choices=["meta", "rms"])
    ap.add_argument("--max-drift", type=float, help="radius / ‖θ_0‖ (default: the experiment's eval.max_drift)")
    ap.add_argument("--fused", action="store_true", help="the meta-learner as one compiled pass (eval.fused_gate)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    keep_freed_memory()  # as train.py/evaluate.py do (DYNLM_MALLOC_KEEP=0: glibc's default)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"experiment={a.experiment}"])
    max_drift = cfg.eval.get("max_drift") if a.max_drift is None else (a.max_drift or None)
    corpus = make_datamodule(cfg).load()
    if a.split:
        stream = corpus.splits[a.split]
        a.updates = math.ceil((stream.numel() - 1) / a.segment)
    else:
        text = torch.cat([corpus.splits[s] for s in ("train", "valid", "test")])
        need = a.updates * a.segment + 1
        stream = text.repeat(math.ceil(need / text.numel()))[:need]
    lm, _ = load_lm(a.run / "lm.ckpt")
    lm_sha = file_sha256(a.run / "lm.ckpt")
    art = load_fisher_optional(a.run, lm_sha)
    meta, meta_dyn = load_meta_for(a.run / "meta.ckpt", lm, lm_sha, art)
    meta_rule = RecordingGateRule(meta, meta_dyn)
    meta.fused = a.fused
    rules = {"meta": (meta_rule, meta_dyn)} if "meta" in a.rules else {}
    tuned = a.run / "tuned.json"
    if "rms" in a.rules and tuned.is_file() and art is not None:
        h = json.loads(tuned.read_text())["best"]["rms"]["hparams"]
        dyn = DynamicWeights.build(lm, fisher_art=art)
        rules["rms"] = (build_rule("rms", h, dyn), dyn)
    rows, curves = [], {}
    for name, (rule, dyn) in rules.items():
        t0 = time.time()
        losses, drift = method_losses(lm, stream, rule, a.segment, dyn, max_drift=max_drift, progress=True)
        sec = time.time() - t0
        finite = bool(torch.isfinite(losses).all()) and all(map(math.isfinite, drift))
        blocks = losses[: losses.numel() // 10 * 10].view(10, -1).mean(1).exp().tolist()  # ppl per tenth
        rows.append((name, len(drift), losses.numel(), finite, max(drift), drift[-1], blocks, sec))
        curves[name] = drift
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name, d in curves.items():
        ax.plot(d, label=name, lw=0.8)
    ax.set_xlabel("update")
    ax.set_ylabel("‖θ_t − θ_0‖")
    if max_drift:
        ax.axhline(max_drift * float(meta_dyn.theta0.norm()), color="k", ls=":", lw=0.8, label="max_drift·‖θ_0‖")
    what = f"the {a.split} split" if a.split else "one stream"
    ax.set_title(f"{a.run.name}: {what}, {a.updates:,} updates of {a.segment} tokens, no reset")
    ax.legend()
    fig.tight_layout()
    stem = f"long_run_{a.run.name}" + (f"_{a.split}" if a.split else "")
    fig.savefig(out / f"{stem}.png", dpi=120)
    lines = [f"`python {' '.join(sys.argv)}` (segment {a.segment}, {a.threads} thread(s), max_drift {max_drift}, "
             f"‖θ_0‖ {float(meta_dyn.theta0.norm()):.1f}; "
             + (f"the {a.split} split of {a.experiment}, once" if a.split else
                "the corpus' three splits repeated: the stream re-reads the same text") + ")", "",
             "| rule | updates | tokens | all finite | max ‖θ−θ0‖ | final ‖θ−θ0‖ | ppl per tenth of the stream | s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, n, tok, fin, dmax, dend, blocks, sec in rows:
        lines.append(f"| {name} | {n:,} | {tok:,} | {fin} | {dmax:.3f} | {dend:.3f} | "
                     f"{' '.join(f'{b:.1f}' for b in blocks)} | {sec:.0f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(r[3] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
