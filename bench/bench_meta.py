"""Meta-training throughput and peak memory: `python bench/bench_meta.py [--unrolls 10 20 40 80] [--steps 1]
[--hidden 0] [--fused] [--modes nested step off]`.

Modes: `off` (no checkpointing), `step` (each inner step a checkpoint region), `nested` (groups of
√(U/2) steps rerun in backward, meta.checkpoint_group=auto), `fast` (meta.fast_first_order: the first-order
meta-gradient from the gates' vector-Jacobian products, no second LM pass; `meta.unroll.FastFirstOrder`),
`fast_nested` (the same in groups of √(U/2) steps whose LM passes the reverse pass reruns: less memory),
`fast_sample` (fast with meta.reverse_sample=`--sample`: the reverse pass on that fraction of the coordinates).

Ratios: tokens/s against static evaluation (`meta.scoring.static_losses`, bptt 70) measured in the same
process, and against a memory roofline of 36 parameter-sized passes per inner step: an evaluation step
touches 12 (the LM's forward and backward read θ, ∇L is written, the gate reads θ, θ_0, ∇L and five
per-coordinate constants and writes θ_t), and training does that work about three times (forward,
recompute, backward), at the copy bandwidth measured in the same process.

model=small (2×512 LSTM, 256-wide tied softmax) at the WikiText-2 vocabulary (33,278 words), random
init and random tokens (speed and memory do not depend on the values), every parameter dynamic
(10.9M coordinates), `--gate` (paper: without fisher.pt; krause_fast, the gate experiment=cpu trains: synthetic
RMS statistics), first order, segment 5, batch 1. Each configuration
runs in a fresh process (peak RSS is a high-water mark), with glibc's mmap threshold fixed so freed
tensors go back to the OS and RSS follows live memory (`--keep-freed`: glibc as train.py sets it, which keeps
freed memory for reuse), and an address-space cap so that a run that would not fit fails fast instead of
swapping the machine. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dynlm_pl.meta.unroll import group_size


def child(argv: list[str]) -> None:
    """One configuration in this (fresh) process: prints one JSON line of timings and peak RSS."""
    import resource

    import torch
    from presets import preset

    from dynlm_pl.cli import keep_freed_memory
    from dynlm_pl.meta.scoring import static_losses
    from dynlm_pl.meta.weights import DynamicWeights
    from dynlm_pl.models import AWDLSTM
    from dynlm_pl.systems.meta import MetaTrainModule

    unroll, mode, steps, threads, cap, hidden = int(argv[0]), argv[1], *map(int, argv[2:6])
    gate_name = argv[8]
    fused, ck = argv[6] == "1", mode not in ("off", "fast", "fast_sample")
    nested = mode in ("nested", "fast_nested")
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    torch.set_num_threads(threads)
    if argv[7] == "1":
        keep_freed_memory()  # --keep-freed: the allocator as train.py sets it (peak RSS then includes what it keeps)
    torch.manual_seed(0)
    model = AWDLSTM(33278, **preset("model", "small")).eval().requires_grad_(False)
    gate = preset("gate", gate_name)
    gate["hidden"] = [hidden] if hidden else []
    dyn = DynamicWeights.build(model)
    if gate_name == "paper":  # no fisher.pt: the features that read it are dropped
        gate["features"] = [f for f in gate["features"] if f not in ("fisher", "rms")]
        gate["lr"] = 1e-3  # the preset leaves the step to the meta stage (the tuned sgd step); speed ignores it
    else:  # synthetic RMS / Fisher statistics, as bench_gate.py (speed does not depend on their values)
        dyn.ms = torch.rand_like(dyn.theta0) * 1e-6 + 1e-9
        dyn.fisher = dyn.ms
    m = MetaTrainModule(model, dyn, gate, segment=5, unroll=unroll, checkpointing=ck,
                        checkpoint_group=group_size("auto", unroll) if nested else 0,
                        fast_first_order=mode.startswith("fast"),
                        reverse_sample=float(argv[9]) if mode == "fast_sample" else 1.0)
    m.meta.fused = fused
    if fused:  # compile outside the timed region: one short unroll (nested: in groups of 2, both update paths)
        keep = dict(m.hparams)
        m.hparams.unroll, m.hparams.checkpoint_group = 4, 2 if nested else 0
        loss = m.unroll(torch.randint(0, 33278, (1, 4 * 5 + 1)), None, *m.initial_state(1))[0]
        if loss.requires_grad:
            loss.backward()
        m.hparams.update(keep)
    data = torch.randint(0, 33278, (2001,))
    static_losses(model, data[:141], bptt=70)
    t0 = time.perf_counter()
    static_losses(model, data, bptt=70)
    static_tps = 2000 / (time.perf_counter() - t0)
    x = torch.empty(64 << 20).normal_()
    y = torch.empty_like(x)
    y.copy_(x)
    t0 = time.perf_counter()
    for _ in range(3):
        y.copy_(x)
    copy_bw = 3 * 2 * x.numel() * 4 / (time.perf_counter() - t0)  # bytes read + written per second
    del x, y
    opt = torch.optim.Adam(m.meta.parameters(), lr=1e-3)
    theta, hidden_state = m.initial_state(1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        for _ in range(steps):  # the timed part: unroll, meta-gradient, Adam step on φ
            chunk = torch.randint(0, 33278, (1, unroll * 5 + 1))
            opt.zero_grad()  # before: the fast mode accumulates φ's gradients inside the unroll
            loss, theta, hidden_state, _ = m.unroll(chunk, None, theta, hidden_state)
            if loss.requires_grad:
                loss.backward()
            opt.step()
            theta, hidden_state = theta.detach(), model.detach_state(hidden_state)
        status = "ok"
    except (RuntimeError, MemoryError) as e:
        status = "OOM" if "memory" in str(e).lower() or isinstance(e, MemoryError) else f"error: {str(e)[:80]}"
    sec = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"status": status, "coords": dyn.spec.numel, "tokens": steps * unroll * 5, "seconds": sec,
                      "peak_mb": peak / 1024, "base_mb": base / 1024, "static_tps": static_tps, "copy_bw": copy_bw}))



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unrolls", type=int, nargs="+", default=[10, 20, 40, 80])
    ap.add_argument("--steps", type=int, default=1, help="meta-steps timed per configuration")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-cap-gb", type=float, default=12.0, help="address-space cap per run")
    ap.add_argument("--hidden", type=int, default=16, help="gate hidden width (0: linear)")
    ap.add_argument("--gate", default="paper", choices=["paper", "krause_fast", "krause_init"],
                    help="gate preset (paper: its log-magnitude features make the update compute-bound)")
    ap.add_argument("--fused", action="store_true", help="meta.fused_gate: the compiled update")
    ap.add_argument("--modes", nargs="+", default=["nested", "step", "off"],
                    choices=["nested", "step", "off", "fast", "fast_nested", "fast_sample"])
    ap.add_argument("--sample", type=float, default=1 / 16, help="fast_sample: meta.reverse_sample")
    ap.add_argument("--keep-freed", action="store_true",
                    help="glibc as train.py sets it (dynlm_pl.cli.keep_freed_memory) instead of RSS = live memory")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ} if args.keep_freed else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows: list[tuple[int, str, dict]] = []
    oom_at: dict[str, int] = {}
    for unroll in args.unrolls:
        for ck in args.modes:
            if ck in oom_at:  # memory grows with unroll: a larger one cannot fit either
                rows.append((unroll, ck, {"status": f"OOM (skipped: already OOM at unroll {oom_at[ck]})"}))
                continue
            t = time.time()
            out = subprocess.run([sys.executable, __file__, "--child", str(unroll), ck, str(args.steps),
                                  str(args.threads), str(int(args.mem_cap_gb * 2**30)), str(args.hidden),
                                  "1" if args.fused else "0", "1" if args.keep_freed else "0", args.gate,
                                  str(args.sample)],
                                 capture_output=True, text=True, cwd=repo, env=env)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            r = json.loads(lines[-1]) if lines else {"status": f"crashed (rc {out.returncode})"}
            rows.append((unroll, ck, r))
            if str(r.get("status", "")).startswith("OOM"):
                oom_at[ck] = unroll
            print(f"# unroll {unroll} checkpointing {ck}: {r} ({time.time() - t:.0f}s wall)", file=sys.stderr,
                  flush=True)
    coords = next((r["coords"] for _, _, r in rows if "coords" in r), 0)
    print(f"\nmeta-training, model=small, V=33,278, {coords:,} dynamic coordinates, gate={args.gate} "
          f"({f'MLP {args.hidden}' if args.hidden else 'linear'}{', fused' if args.fused else ''}), "
          f"first order, segment 5, batch 1, {args.steps} meta-step(s) per row, {args.threads} threads, "
          f"address-space cap {args.mem_cap_gb:g} GB, allocator: "
          f"{'keep_freed_memory (as train.py)' if args.keep_freed else 'RSS = live memory'}\n")
    print("| unroll | checkpointing | status | tokens/s | vs static eval | memory roofline | % | s / meta-step | "
          "peak RSS (MB) | above set-up (MB) | RSS / unroll 10 |")
    print("|---:|:---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ref = {ck: r["peak_mb"] for u, ck, r in rows if u == 10 and r.get("status") == "ok"}
    for unroll, ck, r in rows:
        name = f"{ck} (group {group_size('auto', unroll)})" if ck in ("nested", "fast_nested") else \
            f"{ck} ({args.sample:g})" if ck == "fast_sample" else ck
        if r.get("status") == "ok":
            ratio = f"{r['peak_mb'] / ref[ck]:.2f}x" if ck in ref else "-"
            tps = r["tokens"] / r["seconds"]
            vs = f"{tps / r['static_tps']:.4f}" if "static_tps" in r else "-"
            # 36 parameter-sized passes per inner step of 5 tokens (see the module docstring)
            roof = 5 / (36 * r["coords"] * 4 / r["copy_bw"]) if "copy_bw" in r else None
            rf = (f"{roof:.1f} | {100 * tps / roof:.0f}%") if roof else "- | -"
            print(f"| {unroll} | {name} | ok | {tps:.1f} | {vs} | {rf} | "
                  f"{r['seconds'] / args.steps:.1f} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['base_mb']:.0f} | "
                  f"{ratio} |")
        else:
            peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"
            print(f"| {unroll} | {name} | {r.get('status')} | - | - | - | - | - | {peak} | - | - |")


if __name__ == "__main__":
    child(sys.argv[2:]) if sys.argv[1:2] == ["--child"] else main()
