"""Tokens/s and peak RSS of each evaluate.py method on model=small, against the machine's rooflines.

    python bench/bench_eval.py [--tokens 400] [--segments 5] [--streams 1 4 8 16] [--static-embedding]
                               [--fused] [--threads 2] [--methods static sgd rms meta meta_noflush] [--kernel fused]
                               [--profile FILE] [--gate krause_init|krause_fast] [--max-drift R] [--device cuda]

Random model=small at the WikiText-2 vocabulary (33,278), random tokens, random positive `ms` for the RMS
rule and the krause_init meta-learner (linear gate, all six features; its cost does not depend on the values;
`meta_noflush`: without FLUSH at λ = 0, the variant tuned on WikiText-2; `--gate krause_fast`: the
transcendental-free form, conf/gate/krause_fast.yaml).
`--streams B`: B streams with their own θ (eval.streams); `--tokens` is per stream. `--static-embedding`: the
tied embedding/softmax matrix stays static and shared (meta.dynamic.exclude=[encoder.weight]), as in Krause's
GPT-2 runs. `--fused`: the meta-learner's update as one compiled pass (eval.fused_gate). Each configuration runs
in its own subprocess, so peak RSS is its own. `--device cuda`: model, θ and data on the GPU, the clock read
after a synchronize, the rooflines from the GPU's own copy and matmul, peak memory the CUDA allocator's; the
issue's B = 8 ≥ 4x B = 1 check with the embedding static is `--device cuda --streams 1 8 --methods static sgd
--static-embedding`. Not a test.

Rooflines (per token, per configuration):
  memory: bytes of parameter-sized tensors touched per segment / the measured copy bandwidth. Per segment
          each stream's dynamic θ is read by the forward and the backward, ∇L written, and the update reads θ
          and ∇L and writes θ: 6·B·P_dyn floats, plus the static weights read twice (2·P_static), for B·T tokens.
  matmul: the LM's forward+backward FLOPs (3x the forward's 2·(LSTM + softmax) multiply-adds; 2x for a static
          softmax matrix, whose weight gradient is not computed) / the measured
          GFLOP/s of a softmax-shaped matmul.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from presets import preset

from dynlm_pl.cli import keep_freed_memory

V = 33278  # WikiText-2's vocabulary


def one(method: str, streams: int, segment: int, tokens: int, static_embedding: bool, fused: bool,
        kernel: str = "fused", profile: str | None = None, gate: str = "krause_init",
        max_drift: float | None = None, device: str = "cpu") -> dict:
    """Run one configuration in this process: tokens/s (per stream-token) and what it touched."""
    from dynlm_pl.meta.learner import build_meta_learner
    from dynlm_pl.meta.rules import GateRule, RMSRule, SGDRule
    from dynlm_pl.meta.scoring import adaptive_eval, method_losses, static_losses
    from dynlm_pl.meta.weights import DynamicWeights
    from dynlm_pl.models import AWDLSTM

    torch.manual_seed(0)
    dev = torch.device(device)
    model = AWDLSTM(V, **{**preset("model", "small"), "kernel": kernel}).to(dev).eval().requires_grad_(False)
    data = torch.randint(0, V, (streams * tokens + 1,), device=dev)

    ms = {k: torch.rand_like(p) * 1e-6 + 1e-9 for k, p in model.named_parameters()}
    art = SimpleNamespace(ms=ms, fisher=ms)  # the two fields DynamicWeights.build reads from a FisherArtifact
    dyn = DynamicWeights.build(model, exclude=["encoder.weight"] if static_embedding else [], fisher_art=art)
    total = sum(p.numel() for p in model.parameters())
    if method == "static":
        _sync(dev)
        t0 = time.perf_counter()
        static_losses(model, data, bptt=70, streams=streams)
    else:
        if method.startswith("meta"):  # meta_noflush: z ≡ 0 and λ = 0, as tuned on WikiText-2 (f ≡ 1)
            g = preset("gate", gate)
            meta = build_meta_learner(dict(g, flush=False, lamb=0.0) if method == "meta_noflush" else g,
                                      len(dyn.spec.names)).eval()
            meta.fused = fused
            rule = GateRule(meta, dyn)
        else:
            rule = SGDRule(1e-3) if method == "sgd" else RMSRule(dyn, 5e-5, 0.002, 2e-5)
        warm = data[: streams * 2 * segment + 1]  # first call: compile (fused), allocator warm-up
        with torch.no_grad():
            adaptive_eval(model, warm, rule, segment, dyn, batch_size=streams)
        _sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad(), _profiled(profile, f"{method} B={streams} segment {segment}"):
            if max_drift is None:
                adaptive_eval(model, data, rule, segment, dyn, batch_size=streams)
            else:  # as evaluate.py runs it: the trust region and ‖θ_t − θ_0‖ recorded after every update
                method_losses(model, data, rule, segment, dyn, streams, max_drift=max_drift)
    _sync(dev)
    sec = time.perf_counter() - t0
    # peak memory: the process's RSS on a CPU, the CUDA allocator's peak on a GPU
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens_per_s": streams * tokens / sec, "p_dyn": dyn.spec.numel, "p_total": total, "rss_mb": peak}


def _sync(dev: torch.device) -> None:
    """Wait for the device's queued kernels, so that a wall-clock interval covers them (CUDA runs asynchronously)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextlib.contextmanager
def _profiled(path: str | None, title: str) -> Iterator[None]:
    """With `--profile FILE`: torch.profiler over the timed run, its top operators appended to FILE (self CPU time:
    where the time goes, e.g. the gate pass's one compiled kernel vs the LM's matmuls)."""
    if path is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
    with open(path, "a") as f:
        f.write(f"\n### {title}\n\n```\n{table}```\n")


def machine(device: str = "cpu") -> dict:
    """Measured copy bandwidth (bytes read + written per second) and softmax-shaped matmul GFLOP/s on `device`."""
    dev = torch.device(device)
    x = torch.empty(64 << 20, device=dev)  # 256 MB
    x.normal_()
    y = torch.empty_like(x)
    best = min(_time(lambda: y.copy_(x), dev) for _ in range(5))
    a, b = torch.randn(1120, 256, device=dev), torch.randn(256, V, device=dev)
    mm = min(_time(lambda: a @ b, dev) for _ in range(3))
    return {"copy_gb_s": 2 * x.numel() * 4 / best / 1e9, "matmul_gflop_s": 2 * 1120 * 256 * V / mm / 1e9}


def _time(fn, dev: torch.device) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=400, help="tokens per stream")
    ap.add_argument("--segments", type=int, nargs="+", default=[5])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--methods", nargs="+", default=["static", "sgd", "rms", "meta"],
                    choices=["static", "sgd", "rms", "meta", "meta_noflush"])
    ap.add_argument("--static-embedding", action="store_true")
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--kernel", default="fused", choices=["fused", "manual"],
                    help="model.kernel (B > 1 under fused: StreamLSTM; manual: plain ops)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--profile", metavar="FILE", help="also profile each timed run, top operators appended to FILE")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration, the fastest kept (noisy machines)")
    ap.add_argument("--gate", default="krause_init", choices=["krause_init", "krause_fast", "paper"],
                    help="the conf/gate preset meta/meta_noflush use")
    ap.add_argument("--max-drift", type=float, metavar="R",
                    help="time the loop as evaluate.py runs it (evaluation.method_losses): eval.max_drift=R and the "
                         "drift ‖θ_t − θ_0‖ recorded after every update; default: the bare adaptive_eval loop")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the model, θ and the data live")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration as JSON, in a subprocess
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    keep_freed_memory()  # as train.py/evaluate.py do (DYNLM_MALLOC_KEEP=0: glibc's default)
    if a.one:
        print(json.dumps(one(**json.loads(a.one))))
        return
    if a.device != "cpu" and not torch.cuda.is_available():
        sys.exit(f"error: --device {a.device} needs a CUDA build of torch and a GPU, and this machine has none; "
                 "drop --device")
    m = machine(a.device)
    # LM FLOPs per token (forward): 2·4H(I+H) per layer + 2·E·V softmax; training-like backward = 2x more
    small = preset("model", "small")
    E, H = small["emb_size"], small["hidden_size"]
    lstm, softmax = 2 * 4 * H * (E + H) + 2 * 4 * E * (H + E), 2 * E * V  # layers E->H and H->E (last = emb)
    fwd = lstm + softmax
    print(f"model=small, device {a.device}, {a.threads} threads, load average {os.getloadavg()[0]:.1f}; "
          f"copy {m['copy_gb_s']:.1f} GB/s, softmax matmul {m['matmul_gflop_s']:.1f} GFLOP/s; "
          f"static embedding: {a.static_embedding}, "
          f"fused gate: {a.fused}, gate: {a.gate}, kernel: {a.kernel}, max_drift: {a.max_drift}; best of {a.repeat} "
          "run(s) per row\n")
    print("| method | segment | B | tokens/s | vs static (same B) | cost vs sgd (same B) | vs B=1 | memory roofline "
          "| % | matmul roofline | % | peak RSS (MB; GPU: allocator peak) |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seg in a.segments:
        base: dict[str, float] = {}
        for B in a.streams:
            static = sgd = None
            for meth in a.methods:
                cfg = dict(method=meth, streams=B, segment=seg, tokens=a.tokens, static_embedding=a.static_embedding,
                           fused=a.fused, kernel=a.kernel, profile=a.profile, gate=a.gate,
                           max_drift=a.max_drift, device=a.device)
                cmd = [sys.executable, __file__, "--threads", str(a.threads), "--one", json.dumps(cfg)]
                runs = [subprocess.run(cmd, capture_output=True, text=True) for _ in range(a.repeat)]
                if any(o.returncode for o in runs):
                    err = next(o for o in runs if o.returncode).stderr.strip().splitlines()[-1]
                    print(f"| {meth} | {seg} | {B} | failed: {err} |", flush=True)
                    continue
                r = max((json.loads(o.stdout.strip().splitlines()[-1]) for o in runs), key=lambda r: r["tokens_per_s"])
                tps = r["tokens_per_s"]
                static = tps if meth == "static" else static
                sgd = tps if meth == "sgd" else sgd
                base.setdefault(meth, tps)
                if meth == "static":  # one pass over the weights per 70-token window of B streams
                    mem = 70 * B / (r["p_total"] * 4 / (m["copy_gb_s"] * 1e9))
                    mm = m["matmul_gflop_s"] * 1e9 / fwd
                else:
                    touched = (6 * B * r["p_dyn"] + 2 * (r["p_total"] - r["p_dyn"])) * 4
                    mem = seg * B / (touched / (m["copy_gb_s"] * 1e9))
                    mm = m["matmul_gflop_s"] * 1e9 / (3 * lstm + (2 if a.static_embedding else 3) * softmax)
                vs = f"{tps / static:.3f}" if static else "-"
                cost = f"{sgd / tps:.2f}x" if sgd and meth != "static" else "-"  # time per token / sgd's
                print(f"| {meth} | {seg} | {B} | {tps:,.1f} | {vs} | {cost} | {tps / base[meth]:.2f} | {mem:,.0f} | "
                      f"{100 * tps / mem:.0f}% | {mm:,.0f} | {100 * tps / mm:.0f}% | {r['rss_mb']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
