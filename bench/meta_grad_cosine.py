"""How much the fast first-order meta-gradient (meta.fast_first_order: no path through the hidden state) differs
from autograd's first-order one, on a trained run: the cosine between the two φ gradients per unroll chunk.

    python bench/meta_grad_cosine.py --run runs/smoke --unroll 80 --segment 5 --chunks 8

With `--sample F`: the fast gradient on every coordinate against its estimate from a fraction F of them
(meta.reverse_sample: a fresh sample per chunk), instead of autograd's against the fast one.

φ is the run's meta.ckpt (its lm.ckpt and fisher.pt); chunks are consecutive unrolls of the validation split past
`--skip` tokens (the meta-training text of meta.data=valid), θ carried across them as in meta-training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dynlm_pl import artifacts
from dynlm_pl.data import build_corpus, read_lines, synthetic_corpus
from dynlm_pl.files import file_sha256
from dynlm_pl.meta.rules import GateRule
from dynlm_pl.meta.unroll import FastFirstOrder, Unroller


def valid_tokens(prov: dict, data: str | None) -> torch.Tensor:
    """The validation split the LM was trained with: the synthetic corpus, or WikiText-2 under `data`."""
    if data is None:
        corpus = synthetic_corpus(articles={"train": 200, "valid": 80, "test": 20})
    else:
        corpus = build_corpus({s: read_lines(Path(data) / f"{s}.txt") for s in ("train", "valid", "test")},
                              "wikitext2")
    artifacts.check_same_data(prov, corpus.vocab_hash, "the run's LM")
    return corpus.splits["valid"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--unroll", type=int, default=80)
    ap.add_argument("--segment", type=int, default=5)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--skip", type=int, default=2000, help="validation tokens before the first chunk")
    ap.add_argument("--data", help="a WikiText-2 directory (default: the smoke experiment's synthetic corpus)")
    ap.add_argument("--sample", type=float, help="compare the fast gradient with its meta.reverse_sample estimate")
    ap.add_argument("--fused", action="store_true", help="meta.fused_gate: the compiled update (model=small)")
    a = ap.parse_args()
    torch.manual_seed(0)
    lm, prov = artifacts.load_lm(a.run / "lm.ckpt")
    art = artifacts.load_fisher_optional(a.run, file_sha256(a.run / "lm.ckpt"))
    meta, dyn = artifacts.load_meta_for(a.run / "meta.ckpt", lm, file_sha256(a.run / "lm.ckpt"), art)
    meta.train()
    meta.fused = a.fused
    rule, params = GateRule(meta, dyn), list(meta.parameters())
    args = (lm, rule, dyn, params, a.segment, a.unroll, 1, False, 0, 0.0)
    tokens = valid_tokens(prov, a.data)
    n = a.unroll * a.segment
    theta, hidden = dyn.theta0.clone(), lm.init_hidden(1)
    ref, new = ("fast", f"sample {a.sample:g}") if a.sample else ("full", "fast")
    print(f"`python {' '.join(sys.argv)}`\n\n| chunk | cosine({ref}, {new}) | ‖{new}‖ / ‖{ref}‖ | meta-loss |")
    print("|---:|---:|---:|---:|")
    cos_all = []
    for c in range(a.chunks):
        chunk = tokens[a.skip + c * n : a.skip + (c + 1) * n + 1][None]
        grads = []
        pair = (FastFirstOrder(*args), FastFirstOrder(*args, sample=a.sample)) if a.sample else \
            (Unroller(*args), FastFirstOrder(*args))
        for unroller in pair:
            for p in params:
                p.grad = None
            loss, th, hid, _ = unroller(chunk, None, theta, hidden)
            if loss.requires_grad:
                loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in params]))
        theta, hidden = th.detach(), lm.detach_state(hid)
        cos = float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))
        cos_all.append(cos)
        print(f"| {c} | {cos:.4f} | {float(grads[1].norm() / grads[0].norm()):.3f} | {float(loss):.4f} |")
    print(f"\nmean cosine {sum(cos_all) / len(cos_all):.4f} over {len(cos_all)} chunks of {n} tokens")


if __name__ == "__main__":
    main()
