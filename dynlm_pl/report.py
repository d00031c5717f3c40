"""Turning per-token losses into what a reader looks at: per-article tables, gain curves, token HTML.

Every function takes per-token losses as float arrays `[N-1]` where entry k is the loss of predicting
token k+1 of the split's stream from the tokens before it (batch 1, the stream read in order).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def article_spans(offsets: Sequence[int], n_losses: int) -> list[tuple[int, int]]:
    """[start, end) ranges of loss indices per article. The article starting at token o owns the
    predictions of tokens o .. next-1, i.e. losses o-1 .. next-2; text before the first title joins
    the first article, so the spans tile all losses."""
    if not offsets:
        return [(0, n_losses)]
    starts = [0] + [max(0, min(o - 1, n_losses)) for o in offsets[1:]]
    ends = starts[1:] + [n_losses]
    return list(zip(starts, ends, strict=True))


def per_article(losses: np.ndarray, articles: Sequence[tuple[int, str]]) -> list[dict[str, float | str | int]]:
    """Per article: title, tokens scored, mean loss, perplexity."""
    out = []
    for (s, e), (_, title) in zip(article_spans([o for o, _ in articles], len(losses)), articles or [(0, "")],
                                  strict=True):
        n = e - s
        mean = float(losses[s:e].mean()) if n else math.nan
        out.append({"title": title, "tokens": n, "loss": mean, "ppl": math.exp(mean) if n else math.nan})
    return out


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Centered moving average (edges averaged over what exists)."""
    window = max(1, min(window, len(x)))
    k = np.ones(window)
    return np.convolve(x, k, mode="same") / np.convolve(np.ones_like(x), k, mode="same")


def plot_gain_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], articles: Sequence[tuple[int, str]],
                     path: str | Path, window: int = 500, max_tokens: int | None = None) -> None:
    """Figure 2 (left) of the paper: instantaneous perplexity gain of model A over model B along the
    stream, exp(smoothed loss_B) - exp(smoothed loss_A) (higher = A better), article starts marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(curves), 1, figsize=(12, 2.6 * len(curves)), sharex=True, squeeze=False)
    for ax, (label, (a, b)) in zip(axes[:, 0], curves.items(), strict=True):
        n = len(a) if max_tokens is None else min(len(a), max_tokens)
        gain = np.exp(smooth(b[:n], window)) - np.exp(smooth(a[:n], window))
        ax.plot(np.arange(n), gain, lw=0.8)
        ax.axhline(0, color="k", lw=0.5)
        for o, _ in articles:
            if o < n:
                ax.axvline(o, color="grey", lw=0.4, ls=":")
        ax.set_ylabel("ppl gain")
        ax.set_title(label, fontsize=10)
    axes[-1, 0].set_xlabel(f"token (moving average over {window} tokens; dotted: article starts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_article_gains(rows: dict[str, list[dict]], baseline: str, path: str | Path) -> None:
    """Relative perplexity reduction per article of each method vs `baseline`, articles in stream order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = np.array([r["ppl"] for r in rows[baseline]])
    others = [m for m in rows if m != baseline]
    fig, ax = plt.subplots(figsize=(max(8, 0.18 * len(base)), 3.5))
    width = 0.8 / max(1, len(others))
    for j, m in enumerate(others):
        gain = 100 * (1 - np.array([r["ppl"] for r in rows[m]]) / base)
        ax.bar(np.arange(len(base)) + j * width, gain, width, label=m)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("article (stream order)")
    ax.set_ylabel(f"% ppl reduction vs {baseline}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def token_html(words: Sequence[str], loss_a: np.ndarray, loss_b: np.ndarray, articles: Sequence[tuple[int, str]],
               path: str | Path, name_a: str, name_b: str, max_articles: int | None = None) -> None:
    """Figure 2 (right): each token coloured by loss_A - loss_B (blue: A better, red: A worse), one
    article per section. `words[k]` is the token whose prediction loss is entry k-1."""
    diff = loss_a - loss_b
    scale = float(np.quantile(np.abs(diff), 0.98)) or 1.0
    spans = article_spans([o for o, _ in articles], len(diff))
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(name_a)} vs {html.escape(name_b)}</title>",
             "<style>body{font-family:sans-serif;max-width:70em;margin:auto}span{padding:0 1px}"
             "section{margin-bottom:2em}</style></head><body>",
             f"<h1>Token loss: {html.escape(name_a)} − {html.escape(name_b)}</h1>"
             f"<p>Blue: {html.escape(name_a)} has the lower loss; red: higher. Full colour at ±{scale:.2f} nats. "
             "Hover a word for the numbers.</p>"]
    for idx, ((s, e), (_, title)) in enumerate(zip(spans, articles or [(0, "")], strict=True)):
        if max_articles is not None and idx >= max_articles:
            break
        gain = float(loss_b[s:e].mean() - loss_a[s:e].mean()) if e > s else 0.0
        parts.append(f"<section><h2>{html.escape(title)} <small>(mean gain {gain:+.3f} nats/token)</small></h2><p>")
        for k in range(s, e):
            w, d = words[k + 1], float(diff[k])
            a = min(1.0, abs(d) / scale)
            rgb = "0,90,255" if d < 0 else "255,40,0"
            text = "<br>" if w == "<eos>" else html.escape(w)
            parts.append(f"<span style='background:rgba({rgb},{a:.2f})' title='{html.escape(name_a)} "
                         f"{loss_a[k]:.2f} / {html.escape(name_b)} {loss_b[k]:.2f}'>{text}</span> ")
        parts.append("</p></section>")
    parts.append("</body></html>")
    Path(path).write_text("".join(parts), encoding="utf-8")


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
