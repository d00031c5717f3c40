"""User text through `data=textfile`: every file either reads as the same tokens as a reference split on whitespace
or is refused with one line; a large file streams in bounded memory (property-based: Hypothesis)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynlm_pl.data import EOS, UNK, Corpus, article_index, encode_file, iter_lines, read_lines
from dynlm_pl.errors import DynlmError

WORDS = ["the", "cat", "=", "sat", "Title", "on", "mat", "é", "日本", UNK, EOS]
VOCAB = Corpus(WORDS, {}, {}, "test")


def reference(data: bytes) -> list[str] | None:
    """Tokens a reader must produce for `data` (None: it must refuse): the UTF-8 text without a byte-order mark,
    split on "\\n" into lines (no last empty line after a final newline), each split on whitespace, then <eos>."""
    if b"\x00" in data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        return None
    lines = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
    return [w for line in lines for w in [*line.split(), EOS]]


def encoded_words(path: Path) -> list[str]:
    ids, _ = encode_file(path, VOCAB, progress=False)
    return [WORDS[i] for i in ids.tolist()]


def check_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    want = reference(data)
    if want is None:
        with pytest.raises(DynlmError) as e:
            encode_file(path, VOCAB, progress=False)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        return
    assert encoded_words(path) == [w if w in VOCAB.stoi else UNK for w in want]


PIECES = st.sampled_from(["the", "cat", " ", "  ", "\n", "\r\n", "\t", " = Title = ", "=", "====", "é", "日本",
                          "\u2028", "\u00a0", "\ufeff", "\x00", "\x85", "word"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(PIECES, max_size=40), raw=st.binary(max_size=40), bom=st.booleans(),
       mode=st.sampled_from(["pieces", "raw", "unicode"]), text=st.text(max_size=60))
def test_any_file_reads_as_whitespace_tokens_or_is_refused(tmp_path: Path, pieces: list[str], raw: bytes, bom: bool,
                                                          mode: str, text: str) -> None:
    body = {"pieces": "".join(pieces).encode("utf-8"), "raw": raw, "unicode": text.encode("utf-8", "surrogatepass")}
    data = (b"\xef\xbb\xbf" if bom else b"") + body[mode]
    check_file(tmp_path / "user.txt", data)


@pytest.mark.parametrize("data", [
    b"a very long line " * 20000,  # one 340 kB line, no newline at the end
    b"no newline at the end",
    b"windows\r\nline endings\r\n",
    b"\xef\xbb\xbfbyte-order mark\n",
    b"nul\x00byte\n",
    b"=\n==========\n = =\n",  # lines of only '=' signs
    b"\n = A = \n\n = B = \n\n",  # empty articles
    b"one",  # a file of one token
    b"",
    b"  \n\t\n",
    b"\xff\xfe not utf-8",
], ids=["long-line", "no-final-newline", "crlf", "bom", "nul", "equals", "empty-articles", "one-token", "empty",
        "blank", "latin"])
def test_named_cases(tmp_path: Path, data: bytes) -> None:
    check_file(tmp_path / "case.txt", data)


def test_streaming_reader_equals_the_whole_file_reader(synthetic_corpus: Corpus, tmp_path: Path) -> None:
    """encode_file (one pass, titles decided with one line of look-ahead) gives the ids and article starts of
    read_lines + encode_lines + article_index on text with titles."""
    lines = ["", " = First = ", "", " the cat sat ", " = not a title = inside", "", " = Second = ", "", "mat on"]
    path = tmp_path / "t.txt"
    path.write_text("\n".join(lines) + "\n")
    corpus = Corpus(["the", "cat", "sat", "mat", "on", "=", UNK, EOS], {}, {}, "t")
    ids, arts = encode_file(path, corpus, progress=False)
    assert ids.tolist() == corpus.encode_lines(read_lines(path)).tolist()
    assert arts == article_index(read_lines(path)) == [(1, "First"), (18, "Second")]
    assert list(iter_lines(path)) == lines


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from dynlm_pl.data import Corpus, encode_file, UNK, EOS
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ids, _ = encode_file(Path(sys.argv[1]), Corpus(["the", "cat", UNK, EOS], {}, {}, "m"), progress=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(ids.numel(), (peak - base) // 1024)
""")


def test_a_50_mb_file_streams_in_bounded_memory(tmp_path: Path) -> None:
    """50 MB of text: memory grows by about the ids (8 bytes a token), not by the text and its Python strings
    (reading it whole as lines and a list of ints takes several times the file)."""
    path = tmp_path / "big.txt"
    line = b"the cat sat on the mat and the cat saw the other cat there\n"  # 14 words + <eos> per 59 bytes
    with open(path, "wb") as f:
        for _ in range(50 * 2**20 // len(line)):
            f.write(line)
    size_mb = path.stat().st_size / 2**20
    p = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    n, grew_mb = map(int, p.stdout.split())
    ids_mb = n * 8 / 2**20
    print(f"\n  {size_mb:.0f} MB file, {n:,} tokens: peak RSS grew {grew_mb} MB (ids {ids_mb:.0f} MB)")
    assert n == 15 * (50 * 2**20 // len(line))
    assert grew_mb < 2 * ids_mb + 64, "reading should cost about the ids (an array the tensor shares)"
    assert "read big.txt" in p.stderr  # the progress bar names the file
