"""Where an inner step of the fast first-order meta-gradient spends its time: `python bench/profile_fast.py
[--gate krause_fast] [--segment 5] [--threads 1] [--repeat 5]`.

Times, on model=small with every parameter dynamic (random init, synthetic RMS statistics as bench_gate.py), the
three pieces of `meta.unroll.FastFirstOrder` per inner step: the LM's forward and backward over one segment (∇L_t),
the evaluation update in place on a copy (the forward pass's), and the gate's vector-Jacobian product into θ and φ
(the reverse pass's), each the best of `--repeat` after a warm-up (which compiles). Prints a markdown table.
"""

from __future__ import annotations

import argparse

import torch
from bench_gate import best_of
from presets import preset

from dynlm_pl.cli import keep_freed_memory
from dynlm_pl.meta.learner import build_meta_learner
from dynlm_pl.meta.rules import GateRule
from dynlm_pl.meta.scoring import score
from dynlm_pl.meta.weights import DynamicWeights
from dynlm_pl.models import AWDLSTM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gate", default="krause_fast", choices=["krause_fast", "krause_init", "meta_sgd"])
    ap.add_argument("--segment", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    keep_freed_memory()  # as train.py: parameter-sized temporaries reuse the heap
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = AWDLSTM(33278, **preset("model", "small")).eval().requires_grad_(False)
    dyn = DynamicWeights.build(model)
    dyn.ms = torch.rand_like(dyn.theta0) * 1e-6 + 1e-9
    dyn.fisher = dyn.ms
    gate = preset("gate", a.gate) | {"hidden": []}
    meta = build_meta_learner(gate, len(dyn.spec.names), n_coords=dyn.spec.numel)
    meta.fused = True
    rule = GateRule(meta, dyn)
    theta = dyn.theta0 + 1e-3 * torch.randn_like(dyn.theta0)
    grad, loss = 1e-3 * torch.randn_like(theta), torch.tensor(5.0)
    x, y = torch.randint(0, 33278, (2, 1, a.segment))
    hidden = model.init_hidden(1)

    def lm() -> None:
        th = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            losses, _ = score(model, dyn.spec, th, x, y, hidden)
            torch.autograd.grad(losses.mean(1).sum(), th)

    @torch.no_grad()
    def update() -> None:
        rule.update_(theta.clone(), grad, loss)

    adj = torch.randn_like(theta)

    def vjp() -> None:
        th = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.backward(rule.update(th, grad, loss), adj)

    rows = [(name, best_of(fn, a.repeat)) for name, fn in
            (("LM forward + backward (∇L_t)", lm), ("evaluation update, in place on a copy", update),
             ("gate vector-Jacobian product (into θ and φ)", vjp))]
    print(f"`python bench/profile_fast.py --gate {a.gate} --segment {a.segment} --threads {a.threads}`: "
          f"{dyn.spec.numel:,} coordinates, best of {a.repeat}\n")
    print("| piece of an inner step | ms |\n|---|---:|")
    for name, sec in rows:
        print(f"| {name} | {1000 * sec:.0f} |")


if __name__ == "__main__":
    main()
