"""Tokens/s of each evaluate.py method (batch 1) at several segment lengths on model=small.

    python bench/bench_eval.py [--tokens 2000] [--segments 5 20] [--threads 2]

Random model=small at the WikiText-2 vocabulary (33,278), random tokens, random positive `ms` for the
RMS rule and the krause_init meta-learner (its cost does not depend on the values). Not a test.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from dynlm_pl.dynamic import DynamicWeights, GateRule, RMSRule, SGDRule, adaptive_eval
from dynlm_pl.evaluation import static_losses
from dynlm_pl.models import AWDLSTM
from dynlm_pl.models.meta_learner import build_meta_learner

SMALL = dict(emb_size=256, hidden_size=512, num_layers=2)
GATE = dict(param="krause", hidden=[16], activation="tanh", features=["theta", "delta", "grad", "loss", "rms"],
            embed_dim=4, flush=True, lr=5e-5, lamb=0.002, eps=2e-5)


class _Art:  # the two fields DynamicWeights.build reads from a FisherArtifact
    def __init__(self, model: AWDLSTM) -> None:
        self.ms = {k: torch.rand_like(p) * 1e-6 + 1e-9 for k, p in model.named_parameters()}
        self.fisher = dict(self.ms)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--segments", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = AWDLSTM(33278, **SMALL).eval()
    tokens = torch.randint(0, 33278, (a.tokens + 1,))
    dyn = DynamicWeights.build(model, fisher_art=_Art(model))
    meta = build_meta_learner(GATE, len(dyn.spec.names)).eval()
    print(f"model=small {dyn.spec.numel:,} params, batch 1, {a.tokens} tokens, {a.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| method | segment | tokens/s | ratio to static |\n|---|---:|---:|---:|")
    t0 = time.time()
    static_losses(model, tokens, bptt=70)
    static = a.tokens / (time.time() - t0)
    print(f"| static | (window 70) | {static:,.0f} | 1.00 |")
    for seg in a.segments:
        for name, rule in (("sgd", SGDRule(1e-3)), ("rms", RMSRule(dyn, 5e-5, 0.002, 2e-5)),
                           ("meta", GateRule(meta, dyn))):
            t0 = time.time()
            with torch.no_grad():
                adaptive_eval(model, tokens, rule, seg, dyn)
            tps = a.tokens / (time.time() - t0)
            print(f"| {name} | {seg} | {tps:,.1f} | {tps / static:.3f} |", flush=True)


if __name__ == "__main__":
    main()
