"""`python evaluate.py`: perplexity of the run directory's LM checkpoint on valid and test.

Protocol: the split as `eval.batch_size` contiguous streams (1 by default: one stream, as dynamic
evaluation reads it), windows of `data.bptt` tokens, hidden state carried, perplexity =
exp(total loss / tokens scored).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

from dynlm_pl.common import atomic_write_text, file_sha256, make_datamodule, run_dir
from dynlm_pl.data import StreamWindows, batchify
from dynlm_pl.errors import require
from dynlm_pl.models.awd_lstm import AWDLSTM, detach_hidden, lm_loss
from dynlm_pl.systems.lm import check_same_data, load_lm


@torch.no_grad()
def static_eval(model: AWDLSTM, tokens: Tensor, batch_size: int = 1, bptt: int = 70,
                progress: bool = False) -> tuple[float, int]:
    """Summed loss and tokens scored of `model` (eval mode) over `tokens` [N] read as streams."""
    model.eval()
    streams = batchify(tokens, batch_size)
    hidden, total, n = model.init_hidden(batch_size), 0.0, 0
    for x, y in tqdm(StreamWindows(streams, bptt), disable=not progress, desc="static", leave=False):
        out = model(x, hidden)
        hidden = detach_hidden(out.hidden)
        total += lm_loss(out.logits, y, reduction="sum").item()
        n += y.numel()
    return total, n


def run(cfg: DictConfig) -> dict[str, Any]:
    out = run_dir(cfg)
    dm = make_datamodule(cfg)
    corpus = dm.load()
    model, hp = load_lm(out / "lm.ckpt")
    check_same_data(hp, corpus.vocab_hash, f"the LM in {out / 'lm.ckpt'}")
    splits = list(cfg.eval.splits)
    for s in splits:
        require(s in corpus.splits, f"eval.splits has {s!r}; use valid and/or test")
    batch = int(cfg.eval.get("batch_size", 1))
    results: dict[str, Any] = {"checkpoint": {"lm.ckpt": file_sha256(out / "lm.ckpt")},
                               "data": {"source": corpus.source, "vocab": corpus.vocab_hash},
                               "protocol": {"batch_size": batch, "bptt": dm.bptt}, "splits": {}}
    for s in splits:
        t0 = time.time()
        loss, n = static_eval(model, corpus.splits[s], batch, dm.bptt, progress=True)
        sec = time.time() - t0
        results["splits"][s] = {"static": {"ppl": math.exp(loss / n), "loss": loss / n, "tokens": n,
                                           "tokens_per_s": n / sec, "seconds": sec}}
        print(f"[evaluate] {s}: static ppl {math.exp(loss / n):.2f} over {n} tokens ({n / sec:.0f} tok/s)")
    results["config"] = OmegaConf.to_container(cfg.eval, resolve=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    return results
