"""Training and evaluation throughput of the LM presets on this CPU, against a measured matmul roofline.

    python bench/bench_lm.py [--quick] [--models small awd_lstm] [--vocab 33278]

For each model preset (conf/model/<name>.yaml, random init at the WikiText-2 vocabulary) it times
  * training steps as stage `lm` takes them (forward with carried state, CE + AR/TAR, backward,
    clipping, SGD step) at `--batch` streams x `--bptt` tokens,
  * evaluation windows (eval mode, no grad, carried state) at batch `--eval-batch` (validation) and 1
    (evaluate.py's protocol),
and divides the model's matmul FLOPs per token by the time to get achieved GFLOP/s, then compares that
with the GFLOP/s this machine reaches on a plain 2048² fp32 matmul and on the model's own
softmax-shaped matmul ([B·T, E] x [E, V]). FLOPs counted: embedding lookup free; each LSTM layer
2·4H·(I+H) per token; the tied softmax 2·E·V per token; training = 3x forward (forward + backward).
Elementwise work (gates, dropout, cross-entropy, the optimizer) is not counted, so the fraction of the
roofline is an upper bound on how much faster better kernels could make it.

Prints a markdown table. Numbers move with other load on the machine: the table header records the
load average before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dynlm_pl.models.awd_lstm import AWDLSTM, detach_hidden, lm_loss

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"
WIKITEXT2_VOCAB = 33_278


def model_kwargs(name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_MODEL / f"{name}.yaml"), resolve=True)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def flops_per_token(model: AWDLSTM) -> dict[str, float]:
    """Forward matmul FLOPs per token: LSTM layers and the tied softmax."""
    lstm = 0.0
    for rnn in model.rnns:
        h, i = rnn.hidden_size, rnn.weight_ih.size(1)
        lstm += 2 * 4 * h * (i + h)
    softmax = 2.0 * model.emb_size * model.vocab_size
    return {"lstm": lstm, "softmax": softmax, "forward": lstm + softmax, "train": 3 * (lstm + softmax)}


def timed(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median seconds per call (median: the machine is shared, single slow calls are noise)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def matmul_gflops(m: int, k: int, n: int, reps: int) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * k * n / timed(lambda: a @ b, reps) / 1e9


def bench_train(model: AWDLSTM, batch: int, bptt: int, steps: int) -> float:
    """Tokens/s of stage lm's training step (CE + AR/TAR, clip 0.25, SGD)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, weight_decay=1.2e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.vocab_size, (batch, bptt), generator=g)
    y = torch.randint(0, model.vocab_size, (batch, bptt), generator=g)
    state = {"h": model.init_hidden(batch)}

    def step() -> None:
        out = model(x, state["h"])
        state["h"] = detach_hidden(out.hidden)
        loss = lm_loss(out.logits, y) + 2.0 * out.output.pow(2).mean() \
            + (out.raw_output[:, 1:] - out.raw_output[:, :-1]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()

    return batch * bptt / timed(step, steps)


@torch.no_grad()
def bench_eval(model: AWDLSTM, batch: int, bptt: int, steps: int) -> float:
    model.eval()
    x = torch.randint(0, model.vocab_size, (batch, bptt), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    state = {"h": model.init_hidden(batch)}

    def step() -> None:
        out = model(x, state["h"])
        state["h"] = detach_hidden(out.hidden)
        lm_loss(out.logits, y, reduction="sum").item()

    return batch * bptt / timed(step, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute per model)")
    ap.add_argument("--models", nargs="+", default=["small", "awd_lstm"])
    ap.add_argument("--vocab", type=int, default=WIKITEXT2_VOCAB)
    ap.add_argument("--batch", type=int, default=32, help="training streams (experiment=cpu: 32)")
    ap.add_argument("--bptt", type=int, default=35, help="window length (experiment=cpu: 35)")
    ap.add_argument("--eval-batch", type=int, default=10, help="validation streams (data.eval_batch_size)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_steps, eval_steps, mm_reps = (2, 3, 3) if args.quick else (5, 8, 10)
    load0 = os.getloadavg()

    peak = matmul_gflops(2048, 2048, 2048, mm_reps)
    rows, roof = [], {}
    for name in args.models:
        torch.manual_seed(0)
        model = AWDLSTM(args.vocab, **model_kwargs(name))
        f = flops_per_token(model)
        n_params = sum(p.numel() for p in model.parameters())
        tokens = args.batch * args.bptt
        sm = matmul_gflops(tokens, model.emb_size, args.vocab, mm_reps)
        roof[name] = sm
        for mode, batch, steps, per_tok in (
            ("train", args.batch, train_steps, f["train"]),
            (f"eval b={args.eval_batch}", args.eval_batch, eval_steps, f["forward"]),
            ("eval b=1", 1, eval_steps, f["forward"]),
        ):
            if mode == "train":
                tps = bench_train(model, batch, args.bptt, steps)
            else:
                tps = bench_eval(model, batch, args.bptt, steps)
            achieved = tps * per_tok / 1e9
            rows.append((name, n_params, mode, f"{batch}x{args.bptt}", tps, per_tok / 1e6, achieved,
                         100 * achieved / peak, 100 * achieved / sm))
        del model

    load1 = os.getloadavg()
    print(f"## LM throughput — {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, V={args.vocab}, fp32"
          f"{' (--quick)' if args.quick else ''}")
    print(f"\nLoad average (1/5/15 min) before: {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
          f"after: {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} (other jobs share these cores).\n")
    print(f"Matmul roofline: 2048² fp32 {peak:.1f} GFLOP/s; softmax-shaped "
          + ", ".join(f"{n} [{args.batch * args.bptt}x{model_kwargs(n)['emb_size']}]x"
                      f"[{model_kwargs(n)['emb_size']}x{args.vocab}] {v:.1f} GFLOP/s" for n, v in roof.items())
          + ".\n")
    print("| model | params | mode | batch x bptt | tokens/s | MFLOP/token | GFLOP/s | % of 2048² | "
          "% of softmax matmul |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for name, n_params, mode, shape, tps, mft, ach, p_peak, p_sm in rows:
        print(f"| {name} | {n_params / 1e6:.2f}M | {mode} | {shape} | {tps:,.0f} | {mft:.1f} | {ach:.1f} | "
              f"{p_peak:.0f}% | {p_sm:.0f}% |")
    print("\nFLOPs: LSTM 2·4H(I+H) per layer + softmax 2·E·V per token (forward); training = 3x forward. "
          "WikiText-2 train is 2,088,628 tokens: an epoch takes tokens / (tokens/s) seconds.")


if __name__ == "__main__":
    main()
