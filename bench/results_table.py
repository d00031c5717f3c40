"""The results tables of README.md, made from an evaluate.py results.json so that they cannot drift from it.

    python bench/results_table.py RESULTS.json [--split test]

Prints, for each split of the file (or only `--split`), a markdown table with one row per method: perplexity,
its reduction against the static LM of the same split (positive: lower perplexity, as evaluate.py's results.md
prints it), its ratio of perplexities to rms and to rms_pt with the paired-bootstrap interval over articles when the
file has them, tokens scored, tokens/s. Methods the run skipped are listed under the tables with the reason
evaluate.py recorded. Reads only the JSON file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RATIO_TO = ("rms", "rms_pt")  # baselines whose ratio and interval get a column when the file has them


def _ratio(r: dict[str, Any], base: str) -> str:
    v = (r.get("vs") or {}).get(base)
    return "" if not v else f"{v['ratio']:.4f} [{v['lo']:.4f}, {v['hi']:.4f}]"


def split_table(results: dict[str, Any], split: str) -> str:
    """One split of a results.json as a heading line and a markdown table."""
    rows = results["splits"][split]
    static = rows.get("static", {}).get("ppl")
    protocol = results.get("protocol", {})
    streams = int(protocol.get("streams", 1))
    where = ", ".join(
        ([f"segment {protocol['segment']}"] if "segment" in protocol else [])
        + ["one stream" if streams == 1 else f"{streams} streams, θ {protocol.get('theta', 'per stream')}"]
    )
    level = (protocol.get("bootstrap") or {}).get("level", 0.95)
    ratios = [b for b in RATIO_TO if any(b in (r.get("vs") or {}) for r in rows.values())]
    cols = ["method", "ppl", "vs static", *[f"÷ {b} [{100 * level:.0f}% CI]" for b in ratios], "tokens", "tokens/s"]
    lines = [f"**{split}** ({where})", "", "| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for method, r in rows.items():
        vs = "" if static is None or method == "static" else f"{100 * (1 - r['ppl'] / static):+.1f}%"
        cells = [method, f"{r['ppl']:.2f}", vs, *[_ratio(r, b) for b in ratios], f"{int(r['tokens']):,}",
                 f"{r['tokens_per_s']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(results: dict[str, Any], split: str | None = None) -> str:
    """The tables of every split (or one), then the methods the run skipped."""
    splits = list(results["splits"]) if split is None else [split]
    out = [split_table(results, s) for s in splits]
    skipped = results.get("skipped") or {}
    if skipped:
        out.append("\n".join(f"Skipped: {m}, {why.removeprefix('skipped: ')}." for m, why in skipped.items()))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="an evaluate.py results.json (runs/<name>/results.json)")
    ap.add_argument("--split", help="only this split (valid, test); default: every split in the file")
    a = ap.parse_args(argv)
    try:
        results = json.loads(a.results.read_text())
        available = list(results["splits"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: {a.results} is not a readable evaluate.py results.json ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 2
    if a.split is not None and a.split not in available:
        print(f"error: no split {a.split!r} in {a.results}; it has {', '.join(available)}", file=sys.stderr)
        return 2
    print(render(results, a.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
