"""WikiText2DataModule and its parts: counts, naming, article index, cache, windows, sharding, download,
bad files."""

from __future__ import annotations

import io
import itertools
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor

from dynlm_pl import data as dyn_data
from dynlm_pl.data import (
    EOS,
    SPLITS,
    WIKITEXT2_ARTICLES,
    WIKITEXT2_TOKENS,
    WIKITEXT2_VOCAB,
    Corpus,
    StreamWindows,
    WikiText2DataModule,
    article_index,
    batchify,
    download_wikitext2,
    load_wikitext2,
    shard_streams,
)
from dynlm_pl.errors import DynlmError
from dynlm_pl.runtime import make_datamodule, make_trainer

# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def corpus_lines(corpus: Corpus, split: str) -> list[str]:
    """The split back as WikiText-formatted lines (` w1 w2 `, blank lines as ` `): re-tokenizes the same."""
    words = [corpus.vocab[i] for i in corpus.splits[split].tolist()]
    lines, cur = [], []
    for w in words:
        if w == EOS:
            lines.append(" " + " ".join(cur) + " " if cur else " ")
            cur = []
        else:
            cur.append(w)
    assert not cur, "every line of a tokenized split ends with <eos>"
    return lines


def write_split_files(corpus: Corpus, root: Path, naming: str = "{s}.txt") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        (root / naming.format(s=s)).write_text("".join(line + "\n" for line in corpus_lines(corpus, s)))
    return root


def assert_same_corpus(a: Corpus, b: Corpus) -> None:
    assert a.vocab == b.vocab
    for s in SPLITS:
        assert torch.equal(a.splits[s], b.splits[s]), s
    assert a.articles == b.articles


def assert_one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, f"error is not one line: {msg!r}"
    return msg


def windows(ds: StreamWindows) -> list[tuple[Tensor, Tensor]]:
    return list(iter(ds))


# ----------------------------------------------------------------------------------------------------
# the real WikiText-2 (skipped when absent)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.wikitext
def test_wikitext2_token_counts_and_vocab(wikitext_corpus: Corpus) -> None:
    counts = {s: wikitext_corpus.splits[s].numel() for s in SPLITS}
    assert counts == {"train": 2_088_628, "valid": 217_646, "test": 245_569}
    assert counts == WIKITEXT2_TOKENS
    assert len(wikitext_corpus.vocab) == 33_278 == WIKITEXT2_VOCAB
    assert len(set(wikitext_corpus.vocab)) == len(wikitext_corpus.vocab)
    assert {EOS, "<unk>"} <= set(wikitext_corpus.vocab)
    # Train alone holds every type (README), so ids never exceed the vocabulary in any split.
    assert int(wikitext_corpus.splits["train"].unique().numel()) == WIKITEXT2_VOCAB


@pytest.mark.wikitext
def test_wikitext2_article_index(wikitext_corpus: Corpus) -> None:
    assert {s: len(wikitext_corpus.articles[s]) for s in SPLITS} == {"train": 600, "valid": 60, "test": 60}
    assert {s: len(wikitext_corpus.articles[s]) for s in SPLITS} == WIKITEXT2_ARTICLES
    for s in SPLITS:
        toks = wikitext_corpus.splits[s]
        offsets = [o for o, _ in wikitext_corpus.articles[s]]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
        for off, title in wikitext_corpus.articles[s]:
            n = len(title.split())
            words = [wikitext_corpus.vocab[i] for i in toks[off : off + n + 3].tolist()]
            assert words == ["=", *title.split(), "=", EOS], (s, off, title, words)
    assert wikitext_corpus.articles["train"][0] == (1, "Valkyria Chronicles III")


@pytest.mark.wikitext
def test_wikitext2_wiki_tokens_naming(wikitext_root: Path, tmp_path: Path, _isolated_cache: Path) -> None:
    """The original release's names (`wiki.train.tokens`) load to the same verified corpus."""
    files = dyn_data.find_wikitext2(wikitext_root)
    assert files is not None
    for s in SPLITS:  # symlinks: the data is never copied
        (tmp_path / f"wiki.{s}.tokens").symlink_to(files[s].resolve())
    corpus = load_wikitext2(tmp_path, cache_dir=_isolated_cache, download=False, verify=True)
    assert {s: corpus.splits[s].numel() for s in SPLITS} == WIKITEXT2_TOKENS


# ----------------------------------------------------------------------------------------------------
# naming, article index, cache (synthetic files)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("naming", ["{s}.txt", "wiki.{s}.tokens", "wikitext-2/wiki.{s}.tokens"])
def test_file_naming_accepted(synthetic_corpus: Corpus, tmp_path: Path, naming: str) -> None:
    root = tmp_path / "data"
    (root / "wikitext-2").mkdir(parents=True)
    write_split_files(synthetic_corpus, root, naming)
    corpus = load_wikitext2(root, cache_dir=tmp_path / "cache", download=False, verify=False)
    assert_same_corpus(corpus, synthetic_corpus)


def test_article_index_synthetic(synthetic_corpus: Corpus) -> None:
    for s in SPLITS:
        arts = synthetic_corpus.articles[s]
        assert len(arts) == {"train": 20, "valid": 4, "test": 4}[s]
        toks = synthetic_corpus.splits[s]
        for a, (off, title) in enumerate(arts):
            assert title == f"{s.capitalize()} article {a}"
            assert synthetic_corpus.vocab[int(toks[off])] == "="
            words = [synthetic_corpus.vocab[i] for i in toks[off : off + len(title.split()) + 2].tolist()]
            assert words == ["=", *title.split(), "="]


def test_article_index_rules() -> None:
    lines = [" ", " = Alpha = ", " ", " a b c ", " ", " = = Section = = ", " ", " d = e = f ",
             " x", " = 1 Hz = ", " y ", " ", " = Beta Gamma = ", " ", " g "]
    idx = article_index(lines)
    # Sub-headings and a ` = ... = ` line inside a paragraph are not articles.
    assert [t for _, t in idx] == ["Alpha", "Beta Gamma"]
    flat = [w for line in lines for w in [*line.split(), EOS]]
    for off, title in idx:
        assert flat[off : off + len(title.split()) + 2] == ["=", *title.split(), "="]


def test_cache_serves_second_load(synthetic_corpus: Corpus, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = write_split_files(synthetic_corpus, tmp_path / "data"), tmp_path / "cache"
    first = load_wikitext2(root, cache_dir=cache, download=False, verify=False)
    cached = list(cache.glob("wikitext2-*.pt"))
    assert len(cached) == 1, "the first load must write exactly one cache file"

    def no_build(*a: object, **k: object) -> None:
        raise AssertionError("the second load re-tokenized instead of reading the cache")

    # A cache hit must neither read the text as lines nor rebuild the vocabulary.
    monkeypatch.setattr(dyn_data, "build_corpus", no_build)
    monkeypatch.setattr(dyn_data, "read_lines", no_build)
    second = load_wikitext2(root, cache_dir=cache, download=False, verify=False)
    assert_same_corpus(second, first)
    assert second.source == first.source


def test_cache_invalidated_by_content_and_corruption(synthetic_corpus: Corpus, tmp_path: Path) -> None:
    root, cache = write_split_files(synthetic_corpus, tmp_path / "data"), tmp_path / "cache"
    first = load_wikitext2(root, cache_dir=cache, download=False, verify=False)
    # A corrupt cache file is rebuilt, never trusted.
    (cached,) = cache.glob("wikitext2-*.pt")
    cached.write_bytes(b"not a torch file")
    assert_same_corpus(load_wikitext2(root, cache_dir=cache, download=False, verify=False), first)
    # Changed files get their own cache entry (keyed by content), not the stale tensors.
    (root / "test.txt").write_text(" = Other = \n zz yy \n")
    changed = load_wikitext2(root, cache_dir=cache, download=False, verify=False)
    assert changed.splits["test"].numel() == 7  # = Other = <eos> zz yy <eos>
    assert len(list(cache.glob("wikitext2-*.pt"))) == 2


# ----------------------------------------------------------------------------------------------------
# streams and windows
# ----------------------------------------------------------------------------------------------------


def test_batchify_rows_are_contiguous_slices() -> None:
    data = torch.arange(103)
    s = batchify(data, 4)
    assert s.shape == (4, 25)
    assert torch.equal(s.reshape(-1), data[:100])
    with pytest.raises(DynlmError):
        batchify(torch.arange(5), 4)


@pytest.mark.parametrize("bptt", [1, 7, 35, 1000])
def test_stream_contiguity_across_windows(synthetic_corpus: Corpus, bptt: int) -> None:
    streams = batchify(synthetic_corpus.splits["valid"], 4)
    ds = StreamWindows(streams, bptt)
    ws = windows(ds)
    assert len(ws) == len(ds)
    for x, y in ws:
        assert x.shape == y.shape and x.size(0) == 4
        assert 1 <= x.size(1) <= bptt
        assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the inputs shifted by one"
    # Per stream, the windows tile the stream: y's reproduce stream[1:], x's stream[:-1].
    assert torch.equal(torch.cat([y for _, y in ws], dim=1), streams[:, 1:])
    assert torch.equal(torch.cat([x for x, _ in ws], dim=1), streams[:, :-1])
    # The next window starts where the previous targets ended: the hidden state may be carried.
    for (_, y0), (x1, _) in itertools.pairwise(ws):
        assert torch.equal(x1[:, 0], y0[:, -1])


def test_variable_bptt_deterministic_and_exact(synthetic_corpus: Corpus) -> None:
    streams = batchify(synthetic_corpus.splits["train"], 3)
    n = streams.size(1) - 1
    a = StreamWindows(streams, 35, variable=True, seed=3)
    b = StreamWindows(streams, 35, variable=True, seed=3)
    la = a.lengths(0)
    assert la == b.lengths(0), "same seed, same pass -> same window lengths"
    assert la != StreamWindows(streams, 35, variable=True, seed=4).lengths(0)
    assert la != a.lengths(1), "each pass redraws its lengths"
    assert len(set(la)) > 3 and min(la[:-1]) >= 5
    for epoch in range(2):
        lengths = a.lengths(epoch)
        assert sum(lengths) == n
        assert len(a) == len(lengths), "len() must count the windows the next pass yields"
        ws = windows(a)
        assert [x.size(1) for x, _ in ws] == lengths
        assert torch.equal(torch.cat([y for _, y in ws], dim=1), streams[:, 1:])
    assert a.epoch == 2


def test_bptt_must_be_positive(synthetic_corpus: Corpus) -> None:
    with pytest.raises(DynlmError) as e:
        StreamWindows(batchify(synthetic_corpus.splits["valid"], 2), 0)
    assert_one_line(e.value)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ddp_sharding_disjoint_contiguous_equal(world: int) -> None:
    streams = batchify(torch.arange(1000), 8)
    shards = [shard_streams(streams, r, world) for r in range(world)]
    assert all(s.shape == shards[0].shape for s in shards), "every rank needs the same number of batches"
    assert shards[0].size(0) == 8 // world
    # Concatenated in rank order the shards are the streams: disjoint, nothing lost or reordered.
    assert torch.equal(torch.cat(shards), streams)
    for s in shards:  # each rank's block is one contiguous range of the corpus
        flat = s.reshape(-1)
        assert torch.equal(flat, torch.arange(int(flat[0]), int(flat[0]) + flat.numel()))
    with pytest.raises(DynlmError) as e:
        shard_streams(streams, 0, 3)
    assert_one_line(e.value)


def test_datamodule_shards_by_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    kw = dict(source="synthetic", batch_size=4, eval_batch_size=2, bptt=10, variable_bptt=False,
              synthetic={"articles": {"train": 6, "valid": 2, "test": 2}, "article_len": 100})
    full = WikiText2DataModule(**kw).streams("train", 4)
    parts = []
    for rank in range(2):
        dm = WikiText2DataModule(**kw)
        monkeypatch.setattr(dm, "_rank_world", lambda r=rank: (r, 2))
        parts.append(dm.streams("train", 4))
        x, _ = next(iter(dm.train_dataloader()))
        assert x.size(0) == 2, "batch_size is global: each of 2 ranks reads 2 of the 4 streams"
    assert torch.equal(torch.cat(parts), full)


class _Recorder(L.LightningModule):
    """Records every training target window; no learning (manual optimization, no optimizer step)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[Tensor]] = {}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.seen.setdefault(self.current_epoch, []).append(batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.w], lr=0.0)


def test_trainer_epoch_covers_variable_bptt_stream(compose_cfg) -> None:
    """Through the shipped trainer config, each epoch reads every training token once, in order."""
    cfg = compose_cfg(["experiment=smoke", "data.variable_bptt=true", "data.bptt=20",
                       "data.synthetic.articles={train: 8, valid: 2, test: 2}",
                       "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false"])
    dm = make_datamodule(cfg)
    module = _Recorder()
    trainer = make_trainer(cfg, {"max_epochs": 2}, enable_checkpointing=False)
    trainer.fit(module, datamodule=dm)
    streams = dm.streams("train", cfg.data.batch_size)
    assert sorted(module.seen) == [0, 1]
    for epoch, ys in module.seen.items():
        assert torch.equal(torch.cat(ys, dim=1), streams[:, 1:]), f"epoch {epoch} did not cover the stream"
    assert [y.size(1) for y in module.seen[0]] != [y.size(1) for y in module.seen[1]]


# ----------------------------------------------------------------------------------------------------
# download
# ----------------------------------------------------------------------------------------------------


def _zip_of(corpus: Corpus) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for s in SPLITS:
            text = "".join(line + "\n" for line in corpus_lines(corpus, s))
            z.writestr(f"wikitext-2/wiki.{s}.tokens", text)
    return buf.getvalue()


def _hf_offline(root: Path) -> None:
    raise ModuleNotFoundError("No module named 'huggingface_hub'")


def test_download_from_mirror_zip(synthetic_corpus: Corpus, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    blob, urls = _zip_of(synthetic_corpus), []

    def fake_urlopen(url: str, timeout: float | None = None) -> io.BytesIO:
        urls.append(url)
        return io.BytesIO(blob)

    monkeypatch.setattr(dyn_data, "_download_hf", _hf_offline)
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    root = tmp_path / "wt2"
    download_wikitext2(root)
    assert urls == [dyn_data.MIRROR_URL]
    assert sorted(p.name for p in root.iterdir()) == ["test.txt", "train.txt", "valid.txt"]
    # load_wikitext2 downloads by itself when the files are absent.
    root2 = tmp_path / "wt2-auto"
    corpus = load_wikitext2(root2, cache_dir=tmp_path / "cache", download=True, verify=False)
    assert len(urls) == 2
    assert_same_corpus(corpus, synthetic_corpus)


def test_download_fails_offline_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float | None = None) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(dyn_data, "_download_hf", _hf_offline)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "absent"
    with pytest.raises(DynlmError) as e:
        download_wikitext2(root)
    msg = assert_one_line(e.value)
    assert str(root) in msg and "DYNLM_DATA" in msg and "Fix" in msg
    assert "HF hub" in msg and "mirror" in msg
    with pytest.raises(DynlmError) as e:
        load_wikitext2(root, cache_dir=tmp_path / "cache", download=True)
    assert "DYNLM_DATA" in assert_one_line(e.value)


def test_absent_without_download_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DynlmError) as e:
        load_wikitext2(tmp_path / "nowhere", cache_dir=tmp_path / "cache", download=False)
    msg = assert_one_line(e.value)
    assert "DYNLM_DATA" in msg and "data.root" in msg


# ----------------------------------------------------------------------------------------------------
# bad files
# ----------------------------------------------------------------------------------------------------

BAD_FILES = {
    "missing": (None, "not found"),
    "empty": (b"", "empty"),
    "whitespace": (b"\n \n\n", "empty"),
    "non-utf8": (b" = T = \n caf\xe9 \xff\xfe \n", "UTF-8"),
    "binary": (bytes(range(256)) * 4, "binary"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_train_file(case: str, synthetic_corpus: Corpus, tmp_path: Path) -> None:
    content, expect = BAD_FILES[case]
    root = write_split_files(synthetic_corpus, tmp_path / "data")
    if content is None:
        (root / "train.txt").unlink()
    else:
        (root / "train.txt").write_bytes(content)
    with pytest.raises(DynlmError) as e:
        load_wikitext2(root, cache_dir=tmp_path / "cache", download=False, verify=False)
    assert expect in assert_one_line(e.value)


def test_wrong_counts_are_one_line(synthetic_corpus: Corpus, tmp_path: Path) -> None:
    root = write_split_files(synthetic_corpus, tmp_path / "data")
    with pytest.raises(DynlmError) as e:
        load_wikitext2(root, cache_dir=tmp_path / "cache", download=False, verify=True)
    msg = assert_one_line(e.value)
    assert "2088628" in msg and "verify=false" in msg


def test_atomic_writes_get_plain_file_permissions(tmp_path: Path) -> None:
    """An artifact or cache written atomically is readable by whoever could read a plainly created file."""
    from dynlm_pl.files import atomic_write_text

    plain, atomic = tmp_path / "plain.txt", tmp_path / "atomic.txt"
    plain.write_text("x")
    atomic_write_text(atomic, "x")
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_unroll_chunks_cut_consecutive_unrolls_with_their_reset_flags() -> None:
    """Each chunk holds U segments of M tokens plus the next target; its resets are the mask's columns of those
    segments (None without a mask); `start` skips what a resumed run already read."""
    from dynlm_pl.data import UnrollChunks, article_reset_mask

    streams = torch.arange(2 * 40).view(2, 40)
    mask = article_reset_mask([(0, "a"), (12, "b"), (40 + 27, "c")], 2, 40, 5)  # segment 2 of row 0, 5 of row 1
    chunks = list(UnrollChunks(streams, unroll=3, segment=5, reset_mask=mask))
    assert [c[0, 0].item() for c, _ in chunks] == [0, 15]  # a third chunk would need token 46 of 40
    assert all(c.shape == (2, 16) for c, _ in chunks)
    assert torch.equal(chunks[1][0][1], torch.arange(55, 71))
    assert chunks[0][1].tolist() == [[False, False, True], [False, False, False]]
    assert chunks[1][1].tolist() == [[False, False, False], [False, False, True]]
    assert all(r is None for _, r in UnrollChunks(streams, unroll=3, segment=5))
    resumed = list(UnrollChunks(streams, unroll=3, segment=5, reset_mask=mask, start=15))
    assert len(resumed) == 1 and torch.equal(resumed[0][0], chunks[1][0]) and torch.equal(resumed[0][1], chunks[1][1])
