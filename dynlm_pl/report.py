"""Turning per-token losses into what a reader looks at: per-article tables, gain curves, token HTML.

Every function takes per-token losses as float arrays `[N-1]` where entry k is the loss of predicting
token k+1 of the split's stream from the tokens before it (batch 1, the stream read in order).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynlm_pl.files import atomic_write, atomic_write_text


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


def article_sums(losses: np.ndarray, articles: Sequence[tuple[int, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(summed loss [K], tokens scored [K]) per article (`article_spans`), float64."""
    spans = article_spans([o for o, _ in articles], len(losses))
    sums = np.array([losses[s:e].sum(dtype=np.float64) for s, e in spans])
    return sums, np.array([e - s for s, e in spans], dtype=np.float64)


def paired_bootstrap(loss_a: np.ndarray, loss_b: np.ndarray, articles: Sequence[tuple[int, str]],
                     resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """The ratio ppl_A / ppl_B over the stream and its percentile interval from a paired bootstrap over articles:
    draw K articles with replacement (the same draw for A and B: the pairing), ratio = exp((ΣL_A − ΣL_B) / Σn) over
    the drawn articles, `resamples` times (seeded). Why articles: token losses within an article are correlated, so
    a per-token bootstrap would give intervals far too narrow; articles are the independent units of the split."""
    sa, n = article_sums(loss_a, articles)
    sb, _ = article_sums(loss_b, articles)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(n), size=(resamples, len(n)))  # [R, K] article draws
    counts = np.zeros((resamples, len(n)))
    np.add.at(counts, (np.arange(resamples)[:, None], idx), 1.0)  # how often each article was drawn
    ratios = np.exp((counts @ (sa - sb)) / (counts @ n))
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return {"ratio": float(np.exp((sa.sum() - sb.sum()) / n.sum())), "lo": float(lo), "hi": float(hi),
            "level": level, "resamples": resamples, "articles": len(n)}


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Centered moving average (edges averaged over what exists)."""
    window = max(1, min(window, len(x)))
    k = np.ones(window)
    return np.convolve(x, k, mode="same") / np.convolve(np.ones_like(x), k, mode="same")


def gain_curve(a: np.ndarray, b: np.ndarray, window: int) -> np.ndarray:
    """The perplexity gain of model A over model B along the stream, exp(smoothed loss_B) − exp(smoothed loss_A)
    (higher: A better), per token."""
    return np.exp(smooth(b, window)) - np.exp(smooth(a, window))


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
        gain = gain_curve(a[:n], b[:n], window)
        ax.plot(np.arange(n), gain, lw=0.8)
        ax.axhline(0, color="k", lw=0.5)
        for o, _ in articles:
            if o < n:
                ax.axvline(o, color="grey", lw=0.4, ls=":")
        ax.set_ylabel("ppl gain")
        ax.set_title(label, fontsize=10)
    axes[-1, 0].set_xlabel(f"token (moving average over {window} tokens; dotted: article starts)")
    fig.tight_layout()
    save_figure(fig, path)


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
    _save_article_axes(fig, ax, f"% ppl reduction vs {baseline}", path)


def _save_article_axes(fig: Any, ax: Any, ylabel: str, path: str | Path) -> None:
    """The per-article bar plots' axes (zero line, labels, legend), then the figure saved."""
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("article (stream order)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_article_ratio(loss_a: np.ndarray, loss_b: np.ndarray, articles: Sequence[tuple[int, str]],
                       ci: dict[str, float], name_a: str, name_b: str, path: str | Path) -> None:
    """Per-article % ppl reduction of A over B (bars, stream order) with the whole split's reduction and its
    bootstrap interval (line and band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sa, n = article_sums(loss_a, articles)
    sb, _ = article_sums(loss_b, articles)
    gain = 100 * (1 - np.exp((sa - sb) / np.maximum(n, 1)))
    fig, ax = plt.subplots(figsize=(max(8, 0.18 * len(n)), 3.5))
    ax.bar(np.arange(len(n)), gain, 0.8, color="tab:blue")
    lo, hi = 100 * (1 - ci["hi"]), 100 * (1 - ci["lo"])
    ax.axhspan(lo, hi, color="tab:orange", alpha=0.3, label=f"{100 * ci['level']:.0f}% interval, whole split")
    whole = 100 * (1 - ci["ratio"])
    ax.axhline(whole, color="tab:orange", lw=1.2, label=f"whole split {whole:+.2f}%")
    _save_article_axes(fig, ax, f"% ppl reduction, {name_a} vs {name_b}", path)


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
    atomic_write_text(path, "".join(parts))


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG, written atomically (a full disk keeps the previous plot), then closed."""
    import matplotlib.pyplot as plt

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            fig.savefig(f, dpi=dpi, format="png")

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
