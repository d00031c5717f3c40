"""WikiText-2 (or a synthetic stand-in) as contiguous token streams, shared by every stage.

The data path follows pytorch/examples word_language_model: official splits, whitespace split plus
one `<eos>` per line, a vocabulary over the splits (train alone holds all 33,278 WikiText-2 types),
and `batch_size` contiguous streams cut into windows of `bptt` tokens. Batches are never shuffled
and the model carries its hidden state from one window to the next.
"""

from __future__ import annotations

import array
import codecs
import hashlib
import io
import math
import os
import random
import re
import time
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from dynlm_pl.errors import DynlmError, require
from dynlm_pl.files import atomic_write, atomic_write_bytes, atomic_write_text

SPLITS = ("train", "valid", "test")
EOS = "<eos>"
UNK = "<unk>"
# The official release, counted as whitespace split plus one <eos> per line (../shared/data/README.md).
WIKITEXT2_TOKENS = {"train": 2_088_628, "valid": 217_646, "test": 245_569}
WIKITEXT2_VOCAB = 33_278
WIKITEXT2_ARTICLES = {"train": 600, "valid": 60, "test": 60}
HF_REPO = "Salesforce/wikitext"
HF_FILES = {s: f"wikitext-2-v1/{s if s != 'valid' else 'validation'}-00000-of-00001.parquet" for s in SPLITS}
MIRROR_URL = "https://wikitext.smerity.com/wikitext-2-v1.zip"
# A level-1 heading ` = Title = `; sub-headings ` = = Section = = ` do not match.
_HEADING = re.compile(r"^ = ([^=].*?) = $")


# ----------------------------------------------------------------------------------------------------
# Corpus: vocabulary, flat token tensors, article index
# ----------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    vocab: list[str]  # id -> word
    splits: dict[str, Tensor]  # split -> int64 [n_tokens], the whole split as one stream
    articles: dict[str, list[tuple[int, str]]]  # split -> (token offset, title) of each article start
    source: str  # sha256 of what the corpus was made from (files, or the generator's settings)
    stoi: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stoi = {w: i for i, w in enumerate(self.vocab)}

    @property
    def vocab_hash(self) -> str:
        return hashlib.sha256("\n".join(self.vocab).encode()).hexdigest()

    def encode_lines(self, lines: Sequence[str]) -> Tensor:
        """Encode new text with this vocabulary; unseen words become `<unk>` (which must exist)."""
        unk = self.stoi.get(UNK)
        ids = []
        for line in lines:
            for w in line.split() + [EOS]:
                i = self.stoi.get(w, unk)
                require(i is not None, f"word {w!r} is not in the vocabulary and it has no {UNK}")
                ids.append(i)
        return torch.tensor(ids, dtype=torch.long)


def tokenize(lines: Sequence[str]) -> list[str]:
    return [w for line in lines for w in line.split() + [EOS]]


def title_of(prev: str | None, line: str, nxt: str | None) -> str | None:
    """The title if `line` is an article heading ` = Title = ` standing between blank lines (None: no line), else
    None: formulas like ` = 1 Hz = ` inside a paragraph are not titles."""
    m = _HEADING.match(line.rstrip("\r\n"))
    blank = lambda x: x is None or not x.strip()
    return m.group(1).strip() if m and blank(prev) and blank(nxt) else None


def article_index(lines: Sequence[str]) -> list[tuple[int, str]]:
    """Token offset (in the tokenized stream of `lines`) and title of each ` = Title = ` line."""
    out, offset = [], 0
    for i, line in enumerate(lines):
        t = title_of(lines[i - 1] if i > 0 else None, line, lines[i + 1] if i + 1 < len(lines) else None)
        if t is not None:
            out.append((offset, t))
        offset += len(line.split()) + 1
    return out


def build_corpus(split_lines: dict[str, list[str]], source: str) -> Corpus:
    vocab: dict[str, int] = {}
    toks = {s: tokenize(split_lines[s]) for s in SPLITS}
    for s in SPLITS:  # order of first appearance, train first, as word_language_model does
        for w in toks[s]:
            if w not in vocab:
                vocab[w] = len(vocab)
    splits = {s: torch.tensor([vocab[w] for w in toks[s]], dtype=torch.long) for s in SPLITS}
    articles = {s: article_index(split_lines[s]) for s in SPLITS}
    return Corpus(list(vocab), splits, articles, source)


def iter_lines(path: Path, progress: bool = False) -> Iterator[str]:
    """The lines of a UTF-8 text file without their newline, streamed (memory: one line at a time), as
    `text.split("\n")` would give them (no last empty line after a final newline); a byte-order mark is dropped.
    Refuses a missing, empty, binary (NUL bytes) or non-UTF-8 file with one line; `progress`: a bar over bytes."""
    require(path.is_file(), f"data file {path} does not exist; check data.root or DYNLM_DATA")
    seen_text, offset = False, 0
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, leave=False,
                                     disable=not progress, desc=f"read {path.name}", mininterval=1.0) as bar:
        for k, raw in enumerate(f):  # split on b"\n" only: "\r\n" keeps its "\r", whitespace to str.split()
            bar.update(len(raw))
            start = 3 if k == 0 and raw.startswith(codecs.BOM_UTF8) else 0
            require(b"\x00" not in raw, f"data file {path} is binary, not text; point data.root at the text files")
            try:
                line = raw[start:].decode("utf-8")
            except UnicodeDecodeError as e:
                raise DynlmError(f"data file {path} is not UTF-8 text ({e.reason} at byte {offset + start + e.start}); "
                                 "re-download it or convert it to UTF-8") from None
            offset += len(raw)
            seen_text = seen_text or bool(line.strip())
            yield line[:-1] if line.endswith("\n") else line
    require(seen_text, f"data file {path} is empty; re-download it (delete it and rerun)")


def read_lines(path: Path) -> list[str]:
    """`iter_lines` as a list (the WikiText-2 splits: a few MB each)."""
    return list(iter_lines(path))


def encode_file(path: Path, corpus: Corpus, progress: bool = True) -> tuple[Tensor, list[tuple[int, str]]]:
    """A text file as token ids with `corpus`'s vocabulary (unseen words -> <unk>, which must exist) and its article
    starts (`article_index`), in one streaming pass: memory is the ids (8 bytes a token), not the text."""
    unk = corpus.stoi.get(UNK)
    ids: array.array = array.array("q")
    articles, offset = [], 0
    window: list[str] = []  # the last 3 lines: a title is decided once the line after it is known

    for line in iter_lines(path, progress):
        words = line.split()
        window = [*window[-2:], line]
        if len(window) >= 2 and (t := title_of(window[-3] if len(window) == 3 else None, window[-2], line)):
            articles.append((offset - len(window[-2].split()) - 1, t))
        for w in [*words, EOS]:
            i = corpus.stoi.get(w, unk)
            require(i is not None, f"word {w!r} is not in the vocabulary and it has no {UNK}")
            ids.append(i)
        offset += len(words) + 1
    if window and (t := title_of(window[-2] if len(window) >= 2 else None, window[-1], None)):
        articles.append((offset - len(window[-1].split()) - 1, t))
    # the tensor shares the array's memory (no copy); the array is not resized after this
    return (torch.frombuffer(ids, dtype=torch.long) if ids else torch.empty(0, dtype=torch.long)), articles


# ----------------------------------------------------------------------------------------------------
# WikiText-2: find, download, verify, cache
# ----------------------------------------------------------------------------------------------------


def find_wikitext2(root: Path) -> dict[str, Path] | None:
    """The three split files under `root`, named `train.txt` or `wiki.train.tokens`; None if absent."""
    found = {}
    for s in SPLITS:
        for name in (f"{s}.txt", f"wiki.{s}.tokens", f"wikitext-2/{s}.txt", f"wikitext-2/wiki.{s}.tokens"):
            if (root / name).is_file():
                found[s] = root / name
                break
    return found if len(found) == 3 else None


def _download_hf(root: Path) -> None:
    import pyarrow.parquet as pq
    from huggingface_hub import hf_hub_download  # optional extra `[hf]`

    for s in SPLITS:
        local = hf_hub_download(HF_REPO, HF_FILES[s], repo_type="dataset")
        rows = pq.read_table(local, columns=["text"]).column("text").to_pylist()
        # One row per line of the original file, empty rows included; each keeps its trailing newline.
        atomic_write_text(root / f"{s}.txt", "".join(r if r.endswith("\n") else r + "\n" for r in rows))


def _download_mirror(root: Path, url: str = MIRROR_URL) -> None:
    with urllib.request.urlopen(url, timeout=30) as r:
        blob = r.read()
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        for s in SPLITS:
            name = next(n for n in z.namelist() if n.endswith(f"wiki.{s}.tokens"))
            atomic_write_bytes(root / f"{s}.txt", z.read(name))


def download_wikitext2(root: Path) -> None:
    """Fetch the v1 release into `root` from the HF hub, else the mirror; one-line error if both fail."""
    root.mkdir(parents=True, exist_ok=True)
    errors = []
    for name, fn in (("HF hub", _download_hf), ("mirror", _download_mirror)):
        try:
            fn(root)
            return
        except Exception as e:  # network, missing optional package, bad archive: try the next source
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    raise DynlmError(
        f"WikiText-2 is not under {root} and could not be downloaded ({'; '.join(errors)}). "
        f"Fix: put train.txt/valid.txt/test.txt (or wiki.*.tokens) there, set DYNLM_DATA=/path/to/wikitext-2, "
        f"or run once with network access (pip install 'dynlm[hf]' for the HF hub)"
    )


def default_data_root() -> Path:
    return Path(os.environ.get("DYNLM_DATA") or "data/wikitext-2")


def default_cache_dir() -> Path:
    return Path(os.environ.get("DYNLM_CACHE") or Path.home() / ".cache" / "dynlm")


def load_wikitext2(root: str | Path | None = None, cache_dir: str | Path | None = None,
                   download: bool = True, verify: bool = True) -> Corpus:
    """Tokenized WikiText-2; the first call caches tensors so later loads take well under a second."""
    root = Path(root) if root else default_data_root()
    files = find_wikitext2(root)
    if files is None and download:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            download_wikitext2(root)
        else:  # other ranks of a multi-process job wait for local rank 0's download
            for _ in range(600):
                if (files := find_wikitext2(root)) is not None:
                    break
                time.sleep(1)
        files = find_wikitext2(root)
    require(files is not None, f"WikiText-2 not found under {root} (need train.txt, valid.txt, test.txt); "
            "set data.root or DYNLM_DATA to its directory, or data.download=true with network access")
    digest = hashlib.sha256()
    for s in SPLITS:
        digest.update(files[s].read_bytes())
    source = digest.hexdigest()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cached = cache / f"wikitext2-{source[:16]}.pt"
    if cached.is_file():
        try:
            blob = torch.load(cached, weights_only=True)
            corpus = Corpus(blob["vocab"], blob["splits"], {s: [tuple(a) for a in v]
                                                            for s, v in blob["articles"].items()}, source)
        except Exception:  # a corrupt cache is rebuilt, never trusted
            corpus = None
    else:
        corpus = None
    if corpus is None:
        corpus = build_corpus({s: read_lines(files[s]) for s in SPLITS}, source)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            blob = {"vocab": corpus.vocab, "splits": corpus.splits,
                    "articles": {s: [list(a) for a in v] for s, v in corpus.articles.items()}}
            atomic_write(cached, lambda tmp: torch.save(blob, tmp))
        except OSError:
            pass  # an unwritable cache only costs time
    if verify:
        counts = {s: corpus.splits[s].numel() for s in SPLITS}
        require(counts == WIKITEXT2_TOKENS,
                f"WikiText-2 under {root} has {counts} tokens, expected {WIKITEXT2_TOKENS} for the official "
                "v1 release; replace the files with wikitext-2-v1 or set data.verify=false for another corpus")
        require(len(corpus.vocab) == WIKITEXT2_VOCAB,
                f"WikiText-2 vocabulary has {len(corpus.vocab)} types, expected {WIKITEXT2_VOCAB}")
    return corpus


# ----------------------------------------------------------------------------------------------------
# Synthetic topic-structured corpus: the test fixture and the offline demo
# ----------------------------------------------------------------------------------------------------


def synthetic_corpus(seed: int = 0, vocab_size: int = 400, rare_pool: int = 600,
                     articles: dict[str, int] | None = None, article_len: int = 400,
                     topic_words: int = 6, p_topic: float = 0.15, successors: int = 6,
                     p_jump: float = 0.15, line_len: int = 20) -> Corpus:
    """Deterministic WikiText-like articles that reward adapting while reading.

    Background words follow a sparse Markov chain (each word has `successors` likely next words, with
    Zipfian weights), which a static LM can learn. Each article draws `topic_words` rare words from a
    shared pool and emits one of them with probability `p_topic` at every position: the static LM
    only knows the pool is likely, while a model that adapts can learn which few words this article
    uses. Articles start with ` = Title = ` lines like WikiText, so the same article index applies.
    """
    articles = dict(articles or {"train": 200, "valid": 20, "test": 20})
    rng = random.Random(seed)
    zipf = [1.0 / (r + 1) for r in range(vocab_size)]
    words = [f"w{i}" for i in range(vocab_size)]
    rare = [f"r{i}" for i in range(rare_pool)]
    succ = [rng.choices(range(vocab_size), weights=zipf, k=successors) for _ in range(vocab_size)]
    succ_w = [1.0 / (r + 1) for r in range(successors)]
    split_lines: dict[str, list[str]] = {}
    for split in SPLITS:
        lines: list[str] = []
        for a in range(articles[split]):
            lines += [" ", f" = {split.capitalize()} article {a} = ", " "]
            topic = rng.sample(rare, topic_words)
            topic_w = [1.0 / (r + 1) for r in range(topic_words)]
            prev, n = rng.choices(range(vocab_size), weights=zipf)[0], 0
            while n < article_len:
                toks = []
                for _ in range(max(3, int(rng.gauss(line_len, line_len / 4)))):
                    if rng.random() < p_topic:
                        toks.append(rng.choices(topic, weights=topic_w)[0])
                        continue
                    if rng.random() < p_jump:
                        prev = rng.choices(range(vocab_size), weights=zipf)[0]
                    else:
                        prev = rng.choices(succ[prev], weights=succ_w)[0]
                    toks.append(words[prev])
                lines.append(" " + " ".join(toks) + " ")
                n += len(toks) + 1
            lines.append(" ")
        split_lines[split] = lines
    settings = dict(seed=seed, vocab_size=vocab_size, rare_pool=rare_pool, articles=articles,
                    article_len=article_len, topic_words=topic_words, p_topic=p_topic,
                    successors=successors, p_jump=p_jump, line_len=line_len)
    return build_corpus(split_lines, "synthetic:" + hashlib.sha256(repr(sorted(settings.items())).encode())
                        .hexdigest())


# ----------------------------------------------------------------------------------------------------
# Streams and windows
# ----------------------------------------------------------------------------------------------------


def batchify(data: Tensor, n_streams: int) -> Tensor:
    """[N] -> [n_streams, N // n_streams]: row b is the b-th contiguous slice (the tail is dropped)."""
    n = data.numel() // n_streams
    require(n >= 2, f"{data.numel()} tokens cannot fill {n_streams} streams of at least 2 tokens; "
            "lower the batch size")
    return data[: n * n_streams].view(n_streams, n)


def stream_rows(tokens: Tensor, n_streams: int) -> Tensor:
    """[N] -> [B, n+1], n = (N−1)//B: row b reads tokens b·n .. b·n+n, so consecutive rows overlap by one
    token and every target 1..B·n is scored exactly once (row-major order = stream order). How evaluation reads a
    split as B streams."""
    n = (tokens.numel() - 1) // n_streams
    require(n >= 1, f"{tokens.numel()} tokens cannot fill {n_streams} streams; lower eval.streams")
    return tokens[: n_streams * n + 1].unfold(0, n + 1, n)


def segments(n: int, segment: int) -> list[tuple[int, int]]:
    """(start, length) of consecutive segments covering positions 0..n-2 of a row of n tokens (the last is
    shorter): the inputs of the segments dynamic evaluation scores and then adapts on."""
    return [(i, min(segment, n - 1 - i)) for i in range(0, n - 1, segment)]


def stream_pieces(tokens: Tensor, segment: int, pieces: int = 20) -> list[Tensor]:
    """`tokens` [N] as about `pieces` consecutive pieces, each overlapping the next by one token (the target of one
    is the input of the next) and a multiple of `segment` targets long: dynamic evaluation reading them in order,
    carrying θ and the hidden state (`adaptive_eval(carry=...)`), scores the same segments as one pass over
    `tokens` -- in steps a progress bar can count."""
    n = tokens.numel() - 1
    step = segment * max(1, math.ceil(n / (segment * pieces)))
    return [tokens[i : min(i + step, n) + 1] for i in range(0, n, step)]


def shard_streams(streams: Tensor, rank: int, world: int) -> Tensor:
    """Rank r's own contiguous block of streams: no sampler, no reordering, equal length on every rank."""
    require(streams.size(0) % world == 0,
            f"{streams.size(0)} streams cannot be split evenly over {world} processes; "
            "make the batch size a multiple of the number of devices")
    per = streams.size(0) // world
    return streams[rank * per : (rank + 1) * per]


def rank_world(trainer: Any) -> tuple[int, int]:
    """(global rank, world size) of a Lightning trainer; (0, 1) without one."""
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def fisher_streams(tokens: Tensor, n_tokens: int | None, batch_size: int, seed: int) -> Tensor:
    """The global [batch_size, L] streams the Fisher pass reads: `n_tokens` targets in all (about).

    A contiguous slice of the split starting at an offset drawn from `seed` (the whole split when
    `n_tokens` is None/0 or larger than it), cut into `batch_size` contiguous streams; each stream
    scores L - 1 targets.
    """
    require(batch_size >= 1, f"fisher batch size must be a positive number of streams, got {batch_size}")
    n = tokens.numel()
    if not n_tokens or (n_tokens // batch_size + 1) * batch_size > n:
        return batchify(tokens, batch_size)
    require(n_tokens >= batch_size, f"fisher.tokens={n_tokens} is fewer than one token per stream "
            f"(batch {batch_size}); raise fisher.tokens or lower the batch size")
    length = n_tokens // batch_size + 1
    g = torch.Generator().manual_seed(seed)
    offset = int(torch.randint(0, n - length * batch_size + 1, (1,), generator=g))
    return tokens[offset : offset + length * batch_size].view(batch_size, length)


def article_reset_mask(articles: list[tuple[int, str]], n_streams: int, stream_len: int, segment: int) -> Tensor:
    """[B, n_segments] bool: an article starts among the input tokens of segment j of stream b."""
    n_seg = math.ceil(stream_len / segment)
    mask = torch.zeros(n_streams, n_seg, dtype=torch.bool)
    for off, _ in articles:
        b, p = divmod(off, stream_len)
        if b < n_streams and p > 0:
            mask[b, p // segment] = True
    return mask


class StreamWindows(IterableDataset):
    """Windows (x, y) of shape [B, T] in stream order; y is x shifted by one token.

    With `variable=True`, AWD-LSTM's randomized length: bptt, or bptt/2 with probability 0.05, then
    T ~ N(that, 5) clipped at 5; redrawn each pass from `seed` + pass number, so runs repeat.
    """

    def __init__(self, streams: Tensor, bptt: int, variable: bool = False, seed: int = 0) -> None:
        require(bptt >= 1, f"bptt must be a positive number of tokens, got {bptt}")
        self.streams, self.bptt, self.variable, self.seed, self.epoch = streams, bptt, variable, seed, 0
        # Windows of the next pass already trained on (a run resumed mid-epoch); consumed by that pass.
        self.skip = 0

    def lengths(self, epoch: int) -> list[int]:
        rng, n, out, i = random.Random(self.seed * 100_003 + epoch), self.streams.size(1) - 1, [], 0
        while i < n:
            t = self.bptt
            if self.variable:
                base = self.bptt if rng.random() < 0.95 else self.bptt / 2
                t = max(5, int(rng.gauss(base, 5)))
            t = min(t, n - i)
            out.append(t)
            i += t
        return out

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        lengths = self.lengths(self.epoch)
        self.epoch += 1
        skip, self.skip = self.skip, 0
        i = sum(lengths[:skip])
        for t in lengths[skip:]:
            yield self.streams[:, i : i + t], self.streams[:, i + 1 : i + 1 + t]
            i += t

    def __len__(self) -> int:
        # The exact count of the next pass: Lightning ends an epoch after len() batches, so an estimate
        # (ceil(n / bptt)) silently dropped the tail of every epoch under randomized window lengths.
        if not self.variable:
            return math.ceil((self.streams.size(1) - 1) / self.bptt)
        return len(self.lengths(self.epoch))


class UnrollChunks(IterableDataset):
    """Meta-training batches: (chunk [B, U·M + 1], resets) for consecutive unrolls of `streams` [B, N].

    resets [B, U]: resets[b, k] says an article starts among the inputs of segment k of the chunk in stream b (from
    `reset_mask` [B, n_segments]); None without a mask, so the inner loop never tests it (on a GPU each test is a
    host sync). `start` (tokens per stream) > 0 only for a run resumed mid-pass: the tokens before it were read
    before the checkpoint.
    """

    def __init__(self, streams: Tensor, unroll: int, segment: int, reset_mask: Tensor | None = None,
                 start: int = 0) -> None:
        self.streams, self.unroll, self.segment, self.start = streams, unroll, segment, start
        self.span = unroll * segment
        self.reset_mask = reset_mask
        require(streams.size(1) > self.span + 1, f"the training stream ({streams.size(1)} tokens per stream) is "
                f"shorter than one unroll ({self.span} tokens); lower unroll, meta.segment or meta.streams")

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        for s in range(self.start, self.streams.size(1) - self.span - 1 + 1, self.span):
            first = s // self.segment
            resets = None if self.reset_mask is None else self.reset_mask[:, first : first + self.unroll]
            yield self.streams[:, s : s + self.span + 1], resets


# ----------------------------------------------------------------------------------------------------
# The DataModule: one corpus, cut for the stage that reads it
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FisherCut:
    """`test_dataloader` reads windows of `window` tokens from `batch_size` streams over `tokens` of `split`."""

    split: str
    tokens: int | None
    batch_size: int
    window: int
    seed: int


@dataclass(frozen=True)
class MetaCut:
    """`train_dataloader` reads unroll chunks of `streams` streams of the meta-training text (the training split,
    or the validation split past the selection slice); `val_dataloader` φ's selection tokens, the first
    `val_tokens` of the validation split (None: all of it), in consecutive pieces (`stream_pieces`). `holdout`:
    the selection slice's length (eval.tune.tokens, where the baselines are tuned): meta-training on valid starts
    past it too."""

    source: str
    unroll: int
    segment: int
    streams: int
    val_tokens: int | None
    reset_at_articles: bool = False
    holdout: int = 0


class WikiText2DataModule(L.LightningDataModule):
    """The one DataModule of every stage: WikiText-2 (`source=wikitext2`) or the synthetic corpus.

    By default (the LM stage) batches are (x, y) int64 [B, T] windows of `B` contiguous streams; `batch_size` is
    global: under DDP each rank reads its own `batch_size / world_size` streams. `use(FisherCut(...))` and
    `use(MetaCut(...))` cut the same corpus for the Fisher pass and for meta-training.
    """

    def __init__(self, source: str = "wikitext2", root: str | None = None, cache_dir: str | None = None,
                 download: bool = True, verify: bool = True, batch_size: int = 80, eval_batch_size: int = 10,
                 test_batch_size: int = 1, bptt: int = 70, variable_bptt: bool = True, seed: int = 1111,
                 synthetic: dict[str, Any] | None = None, path: str | None = None) -> None:
        super().__init__()
        for name, v in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                        ("test_batch_size", test_batch_size), ("bptt", bptt)):
            require(isinstance(v, int) and v >= 1, f"data.{name} must be a positive integer, got {v!r}")
        require(source != "textfile", "data=textfile is for `python evaluate.py data=textfile data.path=...`; "
                "train on data=wikitext2 or data=synthetic")
        require(source in ("wikitext2", "synthetic"),
                f"data.source must be 'wikitext2' or 'synthetic', got {source!r}")
        self.source, self.root, self.cache_dir = source, root, cache_dir
        self.download, self.verify, self.synthetic = download, verify, dict(synthetic or {})
        self.batch_size, self.eval_batch_size, self.test_batch_size = batch_size, eval_batch_size, test_batch_size
        self.bptt, self.variable_bptt, self.seed = bptt, variable_bptt, seed
        self.corpus: Corpus | None = None
        self.cut: FisherCut | MetaCut | None = None  # None: the LM stage's windows
        # Set when a run resumes mid-epoch (the LightningModule's on_load_checkpoint): the next training loader
        # starts after what was already trained on (LM: windows; meta: tokens per stream), where Lightning would
        # restart a plain loader's stream.
        self.skip_train_batches = 0
        self.skip_tokens = 0

    def load(self) -> Corpus:
        """The corpus, loaded once (callable before the Trainer exists: models need the vocab size)."""
        if self.corpus is None:
            if self.source == "synthetic":
                self.corpus = synthetic_corpus(**self.synthetic)
            else:
                self.corpus = load_wikitext2(self.root, self.cache_dir, self.download, self.verify)
        return self.corpus

    def prepare_data(self) -> None:
        if self.source == "wikitext2":
            root = Path(self.root) if self.root else default_data_root()
            if find_wikitext2(root) is None and self.download:
                download_wikitext2(root)

    def setup(self, stage: str | None = None) -> None:
        self.load()

    @property
    def vocab_size(self) -> int:
        return len(self.load().vocab)

    def _rank_world(self) -> tuple[int, int]:
        return rank_world(self.trainer)

    def use(self, cut: FisherCut | MetaCut) -> WikiText2DataModule:
        """Cut the corpus for the Fisher pass or meta-training (checked now, before any trainer starts)."""
        if isinstance(cut, MetaCut):
            self._check_meta(cut)
        self.cut = cut
        return self

    # -- LM pretraining ----------------------------------------------------------------------------------
    def streams(self, split: str, n_streams: int) -> Tensor:
        """This rank's [n_streams / world, N] block of the split's contiguous streams."""
        return shard_streams(batchify(self.load().splits[split], n_streams), *self._rank_world())

    def _loader(self, split: str, n_streams: int, variable: bool) -> DataLoader:
        ds = StreamWindows(self.streams(split, n_streams), self.bptt, variable, self.seed)
        if self.trainer is not None:
            # Window lengths are drawn per epoch: a loader rebuilt each epoch (the trainer config reloads
            # them so len() stays exact) or after a resume continues the same sequence of draws.
            ds.epoch = self.trainer.current_epoch
        return _private(ds)

    def train_dataloader(self) -> DataLoader:
        if isinstance(self.cut, MetaCut):
            return self._meta_loader(self.cut)
        loader = self._loader("train", self.batch_size, self.variable_bptt)
        loader.dataset.skip, self.skip_train_batches = self.skip_train_batches, 0
        return loader

    def val_dataloader(self) -> DataLoader:
        if isinstance(self.cut, MetaCut):  # the selection slice in pieces read as one stream (a bar that moves)
            return DataLoader(stream_pieces(self.selection_slice(), self.cut.segment), batch_size=None)
        return self._loader("valid", self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        if isinstance(self.cut, FisherCut):
            c = self.cut
            streams = fisher_streams(self.load().splits[c.split], c.tokens, c.batch_size, c.seed)  # global [B, L]
            return DataLoader(StreamWindows(shard_streams(streams, *self._rank_world()), c.window), batch_size=None)
        return self._loader("test", self.test_batch_size, False)

    # -- meta-training ---------------------------------------------------------------------------------
    def _n_selection(self, cut: MetaCut) -> int:
        valid = self.load().splits["valid"]
        return int(cut.val_tokens) if cut.val_tokens else valid.numel()

    def selection_slice(self) -> Tensor:
        """The first `val_tokens` of the validation split: φ and the baselines are compared on it."""
        require(isinstance(self.cut, MetaCut), "selection_slice() needs use(MetaCut(...)) first")
        return self.load().splits["valid"][: self._n_selection(self.cut)]

    def _meta_text(self, cut: MetaCut) -> tuple[Tensor, list[tuple[int, str]]]:
        """The stream φ learns from and its article starts: the training split, or the validation split past the
        selection slice (the LM has fitted its training text, so adaptation there can teach a rule that held-out
        text punishes)."""
        corpus = self.load()
        if cut.source == "train":
            return corpus.splits["train"], corpus.articles["train"]
        n_sel = self._meta_start(cut)
        return corpus.splits["valid"][n_sel:], [(o - n_sel, t) for o, t in corpus.articles["valid"] if o >= n_sel]

    def _meta_start(self, cut: MetaCut) -> int:
        return max(self._n_selection(cut), int(cut.holdout))

    def roles(self) -> dict[str, str]:
        """The tokens φ is selected on and meta-trained on, as `split[start:end]` (recorded in meta.ckpt)."""
        cut = self.cut
        require(isinstance(cut, MetaCut), "roles() needs use(MetaCut(...)) first")
        splits = self.load().splits
        train = f"train[0:{splits['train'].numel()}] (the LM's training split)" if cut.source == "train" else \
            f"valid[{self._meta_start(cut)}:{splits['valid'].numel()}]"
        return {"φ selection": f"valid[0:{self._n_selection(cut)}]", "meta-training": train}

    def _check_meta(self, cut: MetaCut) -> None:
        require(cut.source in ("train", "valid"), f"meta.data must be train or valid, got {cut.source!r}")
        if cut.source == "valid":
            n_sel, n = self._meta_start(cut), self.load().splits["valid"].numel()
            require(n - n_sel > 2 * cut.unroll * cut.segment * cut.streams, f"meta.data=valid trains on the "
                    f"validation split past its selection slice (first {n_sel} tokens), and {n - n_sel} are left; "
                    "lower eval.tune.tokens and meta.val_tokens")

    def meta_streams(self) -> tuple[Tensor, Tensor | None]:
        """All ranks' meta-training streams [B, N] and their article-reset mask [B, n_segments] (or None)."""
        cut = self.cut
        require(isinstance(cut, MetaCut), "meta_streams() needs use(MetaCut(...)) first")
        text, articles = self._meta_text(cut)
        streams = batchify(text, cut.streams)
        mask = article_reset_mask(articles, cut.streams, streams.size(1), cut.segment) if cut.reset_at_articles \
            else None
        return streams, mask

    def _meta_loader(self, cut: MetaCut) -> DataLoader:
        # Under DDP each rank reads its own contiguous block of the B streams (meta.streams is global): with
        # equal tokens per rank, DDP's gradient average equals one process's per-token mean over all B.
        streams, mask = self.meta_streams()
        rank, world = self._rank_world()
        mine = None if mask is None else shard_streams(mask, rank, world)
        chunks = UnrollChunks(shard_streams(streams, rank, world), cut.unroll, cut.segment, mine, self.skip_tokens)
        self.skip_tokens = 0
        return _private(chunks)


def _private(ds: IterableDataset) -> DataLoader:
    """A loader with a private generator: creating an iterator draws a seed, which from the global generator would
    shift every later dropout mask, so a resumed run (which creates its iterators at other times) would differ."""
    return DataLoader(ds, batch_size=None, num_workers=0, generator=torch.Generator())
