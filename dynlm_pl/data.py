"""WikiText-2 (or a synthetic stand-in) as contiguous token streams, shared by every stage.

The data path follows pytorch/examples word_language_model: official splits, whitespace split plus
one `<eos>` per line, a vocabulary over the splits (train alone holds all 33,278 WikiText-2 types),
and `batch_size` contiguous streams cut into windows of `bptt` tokens. Batches are never shuffled
and the model carries its hidden state from one window to the next.
"""

from __future__ import annotations

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

from dynlm_pl.errors import DynlmError, require

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


def article_index(lines: Sequence[str]) -> list[tuple[int, str]]:
    """Token offset (in the tokenized stream of `lines`) and title of each ` = Title = ` line."""
    out, offset = [], 0
    blank = lambda i: i < 0 or i >= len(lines) or not lines[i].strip()
    for i, line in enumerate(lines):
        # A title stands between blank lines; formulas like ` = 1 Hz = ` inside a paragraph do not.
        m = _HEADING.match(line.rstrip("\n"))
        if m and blank(i - 1) and blank(i + 1):
            out.append((offset, m.group(1).strip()))
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


def read_lines(path: Path) -> list[str]:
    require(path.is_file(), f"data file {path} does not exist; check data.root or DYNLM_DATA")
    raw = path.read_bytes()
    require(len(raw.strip()) > 0, f"data file {path} is empty; re-download it (delete it and rerun)")
    require(b"\x00" not in raw, f"data file {path} is binary, not text; point data.root at the text files")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DynlmError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                         "re-download it or convert it to UTF-8") from None
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


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
        _atomic_write_text(root / f"{s}.txt", "".join(r if r.endswith("\n") else r + "\n" for r in rows))


def _download_mirror(root: Path, url: str = MIRROR_URL) -> None:
    with urllib.request.urlopen(url, timeout=30) as r:
        blob = r.read()
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        for s in SPLITS:
            name = next(n for n in z.namelist() if n.endswith(f"wiki.{s}.tokens"))
            _atomic_write_bytes(root / f"{s}.txt", z.read(name))


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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


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
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            torch.save({"vocab": corpus.vocab, "splits": corpus.splits,
                        "articles": {s: [list(a) for a in v] for s, v in corpus.articles.items()}}, tmp)
            os.replace(tmp, cached)
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


def shard_streams(streams: Tensor, rank: int, world: int) -> Tensor:
    """Rank r's own contiguous block of streams: no sampler, no reordering, equal length on every rank."""
    require(streams.size(0) % world == 0,
            f"{streams.size(0)} streams cannot be split evenly over {world} processes; "
            "make the batch size a multiple of the number of devices")
    per = streams.size(0) // world
    return streams[rank * per : (rank + 1) * per]


class WikiText2DataModule(L.LightningDataModule):
    """The one DataModule of every stage: WikiText-2 (`source=wikitext2`) or the synthetic corpus.

    Batches are (x, y) int64 [B, T] windows of `B` contiguous streams. `batch_size` is global: under
    DDP each rank reads its own `batch_size / world_size` streams.
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
        # Set when a run resumes mid-epoch (LMPretrainModule.on_load_checkpoint): the next training loader
        # starts after the windows already trained on, where Lightning would restart a plain loader's stream.
        self.skip_train_batches = 0

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
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def streams(self, split: str, n_streams: int) -> Tensor:
        """This rank's [n_streams / world, N] block of the split's contiguous streams."""
        return shard_streams(batchify(self.load().splits[split], n_streams), *self._rank_world())

    def _loader(self, split: str, n_streams: int, variable: bool) -> DataLoader:
        ds = StreamWindows(self.streams(split, n_streams), self.bptt, variable, self.seed)
        if self.trainer is not None:
            # Window lengths are drawn per epoch: a loader rebuilt each epoch (the trainer config reloads
            # them so len() stays exact) or after a resume continues the same sequence of draws.
            ds.epoch = self.trainer.current_epoch
        # A private generator: creating an iterator draws a seed, which from the global generator would shift
        # every later dropout mask, so a resumed run (which creates its iterators at other times) would differ.
        return DataLoader(ds, batch_size=None, num_workers=0, generator=torch.Generator())

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", self.batch_size, self.variable_bptt)
        loader.dataset.skip, self.skip_train_batches = self.skip_train_batches, 0
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.test_batch_size, False)
