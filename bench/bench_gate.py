"""One meta-learner update over model=small's 10.9M coordinates: whole-vector, chunked in place, fused.

    python bench/bench_gate.py [--hidden 0 8 16] [--threads 1] [--repeat 3]
    python bench/bench_gate.py --streams 1 8 16 --params rational --hidden 0   # the evaluation pass per stream

`GateRule.update` (meta-training: differentiable, the MLP over all P coordinates at once, [P, k]
features and [P, H] activations in memory) against `MetaLearner.apply_` (evaluation: 32k-coordinate
chunks updated in place, activations in cache), with a plain SGD step as the memory-traffic floor.
`--streams B ...`: instead, the compiled evaluation pass as adaptive evaluation runs it (eval.fused_gate, no
gate sums) over B streams' θ [B, P], with and without FLUSH, in ms per stream update.
Random θ, ∇L and RMS (the cost does not depend on the values). Writes bench/results/bench_gate.md. Not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from presets import GATE_OF_PARAM, preset

from dynlm_pl.cli import keep_freed_memory
from dynlm_pl.meta.learner import MetaLearner
from dynlm_pl.meta.rules import GateRule
from dynlm_pl.meta.weights import DynamicWeights
from dynlm_pl.models import AWDLSTM


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up (allocator, first-touch)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _fwd_bwd(rule: GateRule, theta: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor) -> None:
    """θ_t from a θ that needs grad, and its backward (what one checkpointed inner step recomputes)."""
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        rule.update(th, grad, loss).sum().backward()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, nargs="+", default=[0, 8, 16], help="0: a linear gate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--params", nargs="+", default=["paper", "krause", "rational"])
    ap.add_argument("--streams", type=int, nargs="+", help="time the per-stream evaluation pass at these B instead")
    ap.add_argument("--out", default="bench_gate.md", help="file name under bench/results/")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    keep_freed_memory()  # as train.py/evaluate.py: parameter-sized temporaries reuse the heap, no page faults
    torch.manual_seed(0)
    model = AWDLSTM(33278, **preset("model", "small"))
    dyn = DynamicWeights.build(model)
    dyn.ms = torch.rand_like(dyn.theta0) * 1e-6 + 1e-9
    dyn.fisher = dyn.ms
    theta = dyn.theta0 + 1e-3 * torch.randn_like(dyn.theta0)
    grad, loss = 1e-3 * torch.randn_like(theta), torch.tensor(5.0)
    if a.streams:
        return streams(a, dyn)
    rows = []
    with torch.no_grad():
        sgd = best_of(lambda: theta.clone().add_(grad, alpha=-1e-3), a.repeat)
        for param in a.params:
            for h in a.hidden:
                kw = preset("gate", GATE_OF_PARAM[param]) | {"hidden": [h] if h else []}
                meta = MetaLearner(len(dyn.spec.names), **kw)
                rule = GateRule(meta, dyn)
                full = best_of(lambda rule=rule: rule.update(theta, grad, loss), a.repeat)
                th = theta.clone()
                chunked = best_of(lambda meta=meta, th=th: meta.apply_(th, grad, loss, dyn), a.repeat)
                meta.fused = True  # eval.fused_gate: one torch.compile'd pass per tensor (best_of warms it up)
                fused = best_of(lambda meta=meta, th=th: meta.apply_(th, grad, loss, dyn), a.repeat)
                # meta-training: the differentiable update, forward + backward into φ and θ (meta.fused_gate)
                train = []
                for f in (False, True):
                    meta.fused = f
                    train.append(best_of(lambda rule=rule: _fwd_bwd(rule, theta, grad, loss), a.repeat))
                rows.append((param, h, full, chunked, fused, *train))
                print(param, h, f"whole {full:.3f}s chunked {chunked:.3f}s fused {fused:.3f}s train {train}",
                      flush=True)
    lines = [f"`python bench/bench_gate.py {' '.join(sys.argv[1:])}`: one update of all {dyn.spec.numel:,} coordinates "
             f"of model=small (each gate as its conf/gate preset ships it: {GATE_OF_PARAM}, with the hidden width of "
             f"the row), best of {a.repeat}; plain SGD "
             f"step (θ − η∇L, a copy) {1000 * sgd:.0f} ms.", "",
             "| gate | hidden | whole vector (GateRule.update) | chunked in place (apply_) | fused, compiled "
             "(eval.fused_gate) | fused vs SGD step | training fwd+bwd, eager | training fwd+bwd, fused "
             "(meta.fused_gate) |", "|---|---|---|---|---|---|---|---|"]
    for param, h, full, chunked, fused, t_eager, t_fused in rows:
        lines.append(f"| {param} | {h or 'linear'} | {1000 * full:.0f} ms | {1000 * chunked:.0f} ms | "
                     f"{1000 * fused:.0f} ms | {fused / sgd:.1f}x | {1000 * t_eager:.0f} ms | "
                     f"{1000 * t_fused:.0f} ms |")
    out = Path(__file__).resolve().parent / "results" / a.out
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


@torch.no_grad()
def streams(a: argparse.Namespace, dyn: DynamicWeights) -> None:
    """ms per stream update of the compiled evaluation pass (stats=False) over θ [B, P], FLUSH on and off."""
    lines = [f"`python bench/bench_gate.py {' '.join(sys.argv[1:])}`: the compiled evaluation pass "
             f"(MetaLearner.fused_apply_, no gate sums) over B streams of model=small's {dyn.spec.numel:,} "
             f"coordinates, ms per stream update, best of {a.repeat}; plain SGD step in place for scale.", "",
             "| gate | hidden | B | SGD step | meta (FLUSH) | meta_noflush (λ = 0) | meta vs SGD step |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for B in a.streams:
        theta = dyn.theta0 + 1e-3 * torch.randn(B, dyn.spec.numel)
        grad, loss = 1e-3 * torch.randn_like(theta), torch.full((B,), 5.0)
        sgd = best_of(lambda theta=theta, grad=grad: theta.add_(grad, alpha=-1e-9), a.repeat) / B
        for param in a.params:
            for h in a.hidden:
                t = {}
                for flush in (True, False):
                    kw = preset("gate", GATE_OF_PARAM[param]) | {"hidden": [h] if h else [], "flush": flush,
                                                                  "lamb": 0.002 if flush else 0.0}
                    meta = MetaLearner(len(dyn.spec.names), **kw)
                    meta.fused = True
                    t[flush] = best_of(lambda m=meta, th=theta, g=grad, lo=loss: m.fused_apply_(th, g, lo, dyn,
                                                                                                stats=False),
                                       a.repeat) / B
                lines.append(f"| {param} | {h or 'linear'} | {B} | {1000 * sgd:.1f} ms | {1000 * t[True]:.1f} ms | "
                             f"{1000 * t[False]:.1f} ms | {t[True] / sgd:.1f}x |")
                print(lines[-1], flush=True)
    out = Path(__file__).resolve().parent / "results" / a.out
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
