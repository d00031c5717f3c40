"""Where should the meta-learner learn? A bare-loop meta-training ablation on a finished smoke run.

    python train.py experiment=smoke stage=all     # runs/smoke: lm.ckpt, fisher.pt, tuned.json
    python bench/meta_ablation.py --data train --steps 100
    python bench/meta_ablation.py --data valid --steps 100 --feats loss --lr 1e-2 --reset 0 --no-article-reset

Starts gate=krause_init from the run's TUNED rms rule (tuned.json), meta-trains φ with Adam on the training
split or on the validation split past its first --sel tokens, and prints the adaptive perplexity of
the first --sel validation tokens (the selection slice) every --every steps, then on test. The same
pieces as stage=meta (MetaTrainModule.unroll), without Lightning. Not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from dynlm_pl.artifacts import load_fisher, load_lm
from dynlm_pl.data import MetaCut
from dynlm_pl.meta.scoring import adaptive_eval
from dynlm_pl.meta.weights import DynamicWeights
from dynlm_pl.runtime import make_datamodule
from dynlm_pl.systems.meta import MetaTrainModule

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "smoke")
    ap.add_argument("--data", choices=["train", "valid"], default="train")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--unroll", type=int, default=10)
    ap.add_argument("--order", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--reset", type=int, default=5, help="θ <- θ_0 every N unrolls (0: never)")
    ap.add_argument("--no-article-reset", action="store_true")
    ap.add_argument("--hidden", type=int, default=16, help="gate hidden width (0: a linear gate)")
    ap.add_argument("--start", choices=["best", "rms", "sgd"], default="rms",
                    help="the tuned rule φ starts at (best: whichever tuned better, as stage=meta)")
    ap.add_argument("--feats", default="theta,delta,grad,loss,fisher,rms")
    ap.add_argument("--sel", type=int, default=4000)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides the run was made with (data...)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["experiment=smoke", *a.overrides])
    dm = make_datamodule(cfg).use(MetaCut(a.data, a.unroll, 5, 1, a.sel, not a.no_article_reset))
    test, sel = dm.load().splits["test"], dm.selection_slice()
    lm, _ = load_lm(a.run / "lm.ckpt")
    dyn = DynamicWeights.build(lm, fisher_art=load_fisher(a.run / "fisher.pt"))
    tuned = json.loads((a.run / "tuned.json").read_text())["best"]
    start = a.start if a.start != "best" else min(("sgd", "rms"), key=lambda k: tuned[k]["tune_loss"])
    rms = tuned[start]["hparams"]
    init = dict(rms, rms_scale=True) if start == "rms" else dict(lr=rms["lr"], lamb=0.0, rms_scale=False)
    gate = dict(param="krause", hidden=[a.hidden] if a.hidden else [], activation="tanh",
                features=a.feats.split(","), embed_dim=4, flush=True, clamp=5.0, **init)
    mod = MetaTrainModule(lm, dyn, gate, segment=5, unroll=a.unroll, order=a.order, reset_every=a.reset, lr=a.lr)
    opt = torch.optim.Adam(mod.meta.parameters(), lr=a.lr)
    print(f"{vars(a)}\nstep 0: selection ppl {math.exp(mod.adaptive_loss(sel)):.2f} (= tuned {start} {rms})",
          flush=True)
    step, n_unrolls, theta, hidden, t0 = 0, 0, None, None, time.time()
    while step < a.steps:
        for chunk, resets in dm.train_dataloader():
            if theta is None or (a.reset and n_unrolls % a.reset == 0):
                theta, h0 = mod.initial_state(1)
                hidden = h0 if hidden is None else hidden
            loss, theta, hidden, _ = mod.unroll(chunk, resets, theta, hidden)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(mod.meta.parameters(), 1.0)
            opt.step()
            theta, hidden = theta.detach(), lm.detach_state(hidden)
            n_unrolls += 1
            step += 1
            if step % a.every == 0:
                g = {k: round(float(v), 4) for k, v in mod.meta.last_gates.items()}
                print(f"step {step} ({time.time() - t0:.0f}s): meta-loss {loss.item():.3f}, selection ppl "
                      f"{math.exp(mod.adaptive_loss(sel)):.2f}, mean gates {g}", flush=True)
            if step >= a.steps:
                break
    print(f"test ppl {math.exp(float(adaptive_eval(lm, test, mod.rule, 5, dyn).mean())):.2f}")


if __name__ == "__main__":
    main()
