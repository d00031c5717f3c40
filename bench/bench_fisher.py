"""Seconds to compute diag F for model=small over 100k WikiText-2 tokens, with each estimator.

    python bench/bench_fisher.py [--ckpt runs/cpu/lm.ckpt] [--data /path/to/wikitext-2] [--tokens 100000]

Without --ckpt: a randomly initialised model=small (emb 256, hidden 512, 2 layers) at the real
vocabulary size (33,278). Estimator settings come from conf/fisher/default.yaml. Prints markdown.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dynlm_pl.data import load_wikitext2
from dynlm_pl.fisher import estimate_fisher, summarize
from dynlm_pl.models.awd_lstm import AWDLSTM

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=None, help="an lm.ckpt to use instead of a random model=small")
    ap.add_argument("--data", default=os.environ.get("DYNLM_DATA", "data/wikitext-2"))
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--estimators", default="batch_ms,empirical")
    ap.add_argument("--seed", type=int, default=1111)
    args = ap.parse_args()

    fcfg = OmegaConf.load(ROOT / "conf/fisher/default.yaml")
    tokens = load_wikitext2(args.data).splits["train"]
    if args.ckpt:
        from dynlm_pl.artifacts import load_lm

        model, _ = load_lm(args.ckpt)
        what = f"LM checkpoint {args.ckpt}"
    else:
        small = OmegaConf.load(ROOT / "conf/model/small.yaml")
        torch.manual_seed(args.seed)
        model = AWDLSTM(33_278, small.emb_size, small.hidden_size, small.num_layers).eval()
        what = "random init"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model=small ({what}), {n_params / 1e6:.2f}M parameters, vocab {model.vocab_size}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}, "
          f"load average before {os.getloadavg()[0]:.1f}\n")

    settings = {"empirical": (fcfg.batch_size, fcfg.window), "batch_ms": (fcfg.ms_batch_size, fcfg.ms_window)}
    results = {}
    for est in args.estimators.split(","):
        batch, window = settings[est]
        t0 = time.perf_counter()
        fisher, n = estimate_fisher(model, tokens, est, args.tokens, batch, window, args.seed, progress=True)
        dt = time.perf_counter() - t0
        results[est] = (fisher, n, dt, batch, window)
        print(f"{est}: {n:,} tokens in {dt:.1f}s", flush=True)

    print("| estimator | batch (streams) | window | tokens | seconds | tokens/s |")
    print("|---|---|---|---|---|---|")
    for est, (_, n, dt, batch, window) in results.items():
        print(f"| {est} | {batch} | {window} | {n:,} | {dt:.1f} | {n / dt:.0f} |")
    for est, (fisher, *_) in results.items():
        print(f"\nF per parameter tensor, estimator `{est}`:\n")
        print("| tensor | shape | min | median | max |")
        print("|---|---|---|---|---|")
        for name, shape, lo, med, hi in summarize(fisher):
            print(f"| {name} | {'×'.join(map(str, shape))} | {lo:.3g} | {med:.3g} | {hi:.3g} |")
    print(f"\nload average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
