"""Reading a large user text file (`data=textfile`): seconds and peak memory of `data.encode_file`, which streams
it line by line into token ids, against reading it whole the old way (`read_lines` + `Corpus.encode_lines`).

    python bench/bench_textfile.py [--mb 50] [--whole]

Each reader runs in its own process (peak RSS is per process: ru_maxrss), on a generated file of `--mb` MB.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

READER = textwrap.dedent("""
    import resource, sys, time
    from pathlib import Path
    from dynlm_pl.data import Corpus, encode_file, read_lines, UNK, EOS
    corpus = Corpus(["the", "cat", "sat", "on", "mat", UNK, EOS], {}, {}, "bench")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    if sys.argv[2] == "stream":
        ids, _ = encode_file(Path(sys.argv[1]), corpus, progress=False)
    else:
        ids = corpus.encode_lines(read_lines(Path(sys.argv[1])))
    print(ids.numel(), time.time() - t0, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--whole", action="store_true", help="also time the whole-file reader")
    a = ap.parse_args()
    line = b"the cat sat on the mat and the cat saw the other cat there\n"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "big.txt"
        with open(path, "wb") as f:
            for _ in range(a.mb * 2**20 // len(line)):
                f.write(line)
        size = path.stat().st_size / 2**20
        print(f"`python {' '.join(sys.argv)}`: a {size:.0f} MB file\n")
        print("| reader | tokens | seconds | peak RSS growth (MB) | MB per million tokens |")
        print("|---|---:|---:|---:|---:|")
        for mode in ["stream", "whole"] if a.whole else ["stream"]:
            out = subprocess.run([sys.executable, "-c", READER, str(path), mode], capture_output=True, text=True,
                                 check=True).stdout.split()
            n, sec, mb = int(out[0]), float(out[1]), float(out[2])
            name = "encode_file (streaming)" if mode == "stream" else "read_lines + encode_lines (whole file)"
            print(f"| {name} | {n:,} | {sec:.1f} | {mb:.0f} | {mb / (n / 1e6):.1f} |")


if __name__ == "__main__":
    main()
