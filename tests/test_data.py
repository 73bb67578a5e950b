"""calibfast.data: calibration datasets and sample selection."""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibfast.data import (STRATEGIES, CalibrationDataset, TokenizationError, allocate, coverage_radius,
                            deduplicate, kcenter, kmeans, length_buckets, select, stratified)

from conftest import DEVICES


def blobs(k=6, per=40, dim=8, sep=50.0, seed=0, sizes=None):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * sep
    sizes = sizes or [per] * k
    x = torch.cat([centres[i] + torch.randn(s, dim, generator=g) for i, s in enumerate(sizes)])
    labels = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    return x, labels


# ---- select: contract ---------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n", [1, 7, 60])
def test_select_returns_n_distinct_sorted_indices(strategy, n):
    x, _ = blobs(k=5, per=12)
    lengths = np.arange(len(x)) * 3 + 1
    idx = select(x, n, strategy, seed=3, lengths=lengths)
    assert idx.dtype == torch.int64 and idx.device.type == "cpu"
    assert len(idx) == n == len(set(idx.tolist()))
    assert idx.tolist() == sorted(idx.tolist())
    assert 0 <= int(idx.min()) and int(idx.max()) < len(x)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_select_is_deterministic_for_a_seed(strategy):
    x, _ = blobs(k=4, per=25)
    lengths = (np.arange(len(x)) % 37) * 5 + 2
    a = select(x, 10, strategy, seed=11, lengths=lengths)
    b = select(x.clone(), 10, strategy, seed=11, lengths=lengths.copy())
    assert torch.equal(a, b)
    # and the seed matters (for the strategies with any randomness in them)
    others = {tuple(select(x, 10, strategy, seed=s, lengths=lengths).tolist()) for s in range(6)}
    assert len(others) > 1


def test_select_accepts_numpy_and_whole_pool():
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    for strategy in STRATEGIES:
        idx = select(x, 30, strategy, seed=0, lengths=np.ones(30))
        assert idx.tolist() == list(range(30))
    assert len(select(x, 0, "kmeans")) == 0


def test_select_bad_input_errors():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="n=11 distinct samples from the pool of 10"):
        select(x, 11, "random")
    for strategy in STRATEGIES:
        with pytest.raises(ValueError, match="empty pool"):
            select(torch.zeros(0, 3), 1, strategy, lengths=[])
    with pytest.raises(ValueError, match="unknown selection strategy 'best'"):
        select(x, 2, "best")
    with pytest.raises(ValueError, match="needs lengths"):
        select(x, 2, "length")
    with pytest.raises(ValueError, match="lengths has 3 entries but the pool has 10"):
        select(x, 2, "length", lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="NaN or Inf"):
        select(torch.full((4, 2), math.nan), 2, "kcenter")
    with pytest.raises(ValueError, match="2-d"):
        select(torch.randn(10), 2, "random")
    with pytest.raises(ValueError, match="needs embeddings"):
        select(None, 2, "kmeans", lengths=[1] * 5)
    with pytest.raises(ValueError, match=">= 0"):
        select(x, -1, "random")
    with pytest.raises(TypeError, match="n must be an int"):
        select(x, 2.0, "random")
    # embeddings None: the pool size comes from lengths
    assert len(select(None, 3, "random", lengths=[5] * 8)) == 3


# ---- stratification -----------------------------------------------------------------------------

def test_allocate_proportional_is_largest_remainder():
    assert allocate([0, 10, 3, 100], 10).tolist() == [0, 1, 0, 9]
    assert allocate([50, 30, 20], 10).tolist() == [5, 3, 2]
    # 7 * [1/3, 1/3, 1/3] = 2.33 each: the one left goes to the lowest index
    assert allocate([3, 3, 3], 7).tolist() == [3, 2, 2]


def test_allocate_equal_redistributes_empty_and_full_buckets():
    # the empty bucket's share goes to the others
    assert allocate([0, 10, 3, 100], 10, "equal").tolist() == [0, 4, 3, 3]
    # a bucket cannot give more than it holds; the rest is shared out again
    assert allocate([1, 100, 100], 9, "equal").tolist() == [1, 4, 4]
    assert allocate([5, 0, 1], 6, "equal").tolist() == [5, 0, 1]
    with pytest.raises(ValueError, match="n=7"):
        allocate([3, 3], 7)
    with pytest.raises(ValueError, match="allocation"):
        allocate([3, 3], 2, "uniform")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=12), st.data(),
       st.sampled_from(["proportional", "equal"]))
def test_allocate_properties(sizes, data, mode):
    total = sum(sizes)
    n = data.draw(st.integers(0, total))
    if total == 0:
        return
    q = allocate(sizes, n, mode)
    sizes = np.array(sizes)
    assert q.sum() == n
    assert np.all(q >= 0) and np.all(q <= sizes)
    assert np.all(q[sizes == 0] == 0)
    if mode == "proportional":
        ideal = n * sizes / total
        assert np.all(q >= np.floor(ideal)) and np.all(q <= np.ceil(ideal))
    else:
        # equal: buckets not at capacity differ by at most one
        free = q < sizes
        if free.sum() > 1:
            assert q[free].max() - q[free].min() <= 1
        # and a bucket at capacity holds at most one more than one with room (the remainder's +1)
        if free.any() and (~free & (sizes > 0)).any():
            assert q[~free & (sizes > 0)].max() <= q[free].max() + 1


def test_length_stratification_proportions():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(16, 32, 300), rng.integers(64, 128, 100), rng.integers(512, 1024, 40),
                              [5000, 9000]])  # the last two are beyond any "largest bucket"
    buckets = length_buckets(lengths)
    n = 50
    expected = allocate(np.bincount(buckets)[np.unique(buckets)], n)
    for seed in range(5):
        idx = select(None, n, "length", seed=seed, lengths=lengths).numpy()
        got = np.array([np.sum(buckets[idx] == b) for b in np.unique(buckets)])
        assert got.tolist() == expected.tolist()
    # equal allocation over explicit edges; lengths beyond the last edge are kept in the last bucket
    edges = [0, 32, 128, 1024]
    b2 = length_buckets(lengths, edges)
    assert b2.max() == 2 and np.sum(b2 == 2) == 42
    idx = select(None, 30, "length", seed=1, lengths=lengths, buckets=edges, allocation="equal").numpy()
    assert np.bincount(b2[idx]).tolist() == [10, 10, 10]
    idx = select(None, 200, "length", seed=1, lengths=lengths, buckets=edges, allocation="equal").numpy()
    assert np.bincount(b2[idx]).tolist() == [79, 79, 42]  # the last bucket's shortfall goes to the others


def test_length_buckets_forms():
    lengths = [0, 1, 2, 3, 4, 7, 8, 1000]
    assert length_buckets(lengths).tolist() == [0, 0, 1, 1, 2, 2, 3, 9]
    assert set(length_buckets(lengths, 3).tolist()) <= {0, 1, 2}
    assert length_buckets(lengths, [2, 4, 8]).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="ascending"):
        length_buckets(lengths, [4, 2])


def test_stratified_draws_within_strata():
    labels = np.array(["a"] * 10 + ["b"] * 30 + ["c"] * 60)
    idx = stratified(labels, 10, seed=4).numpy()
    assert [np.sum(labels[idx] == s) for s in "abc"] == [1, 3, 6]
    assert torch.equal(stratified(labels, 10, seed=4), stratified(labels, 10, seed=4))


# ---- clusters and coverage ----------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_one_pick_per_well_separated_cluster(seed):
    x, labels = blobs(k=6, per=30, seed=seed, sizes=[10, 20, 30, 40, 50, 60])
    for strategy in ("kmeans", "kcenter"):
        idx = select(x, 6, strategy, seed=seed)
        assert sorted(labels[idx].tolist()) == list(range(6)), strategy
    # cluster: k = 6 clusters, draws in proportion to their sizes (210 samples, n = 21 -> size / 10)
    idx = select(x, 21, "cluster", seed=seed, k=6)
    assert torch.bincount(labels[idx], minlength=6).tolist() == [1, 2, 3, 4, 5, 6]


def test_kmeans_recovers_blobs():
    x, labels = blobs(k=5, per=40, seed=2)
    centers, lab = kmeans(x, 5, seed=0)
    assert centers.shape == (5, 8)
    # a bijection between found and true clusters
    pairs = {(int(a), int(b)) for a, b in zip(lab, labels)}
    assert len(pairs) == 5


def test_kmeans_with_duplicates_still_gives_distinct_picks():
    base = torch.randn(8, 3)
    x = base.repeat_interleave(5, dim=0)  # 8 distinct points, 5 copies each
    for n in (8, 12, 40):
        idx = select(x, n, "kmeans", seed=1)
        assert len(set(idx.tolist())) == n
    idx = select(x, 8, "kmeans", seed=1)
    assert len({tuple(r) for r in x[idx].tolist()}) == 8  # one copy of each point
    idx = select(x, 8, "kcenter", seed=1)
    assert len({tuple(r) for r in x[idx].tolist()}) == 8


@pytest.mark.parametrize("dim", [2, 3])
def test_kcenter_covers_no_worse_than_random(dim):
    g = torch.Generator().manual_seed(dim)
    x = torch.rand(800, dim, generator=g)
    for seed in range(10):
        r_k = coverage_radius(x, select(x, 32, "kcenter", seed=seed))
        r_r = coverage_radius(x, select(x, 32, "random", seed=seed))
        assert r_k <= r_r
    # the greedy order is a prefix order: the first m of an n-traversal are the m-traversal
    assert kcenter(x, 20, seed=3)[:10].tolist() == kcenter(x, 10, seed=3).tolist()


def test_deduplicate_and_select_with_dedup():
    x = torch.randn(20, 6)
    xd = torch.cat([x, x[:5] * 1.0001, x[5:10] + 1e-5])  # near-copies of the first 10
    kept = deduplicate(xd, 0.999)
    assert kept.tolist() == list(range(20))
    assert deduplicate(xd, 1.0).tolist() == list(range(20))  # exact duplicates go too (up to rounding)
    for strategy in STRATEGIES:
        idx = select(xd, 20, strategy, seed=0, lengths=np.ones(30), dedup=0.999)
        assert idx.tolist() == list(range(20))
    with pytest.raises(ValueError, match="after near-duplicate removal"):
        select(xd, 21, "random", dedup=0.999)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        deduplicate(xd, 1.5)


@pytest.mark.parametrize("device", DEVICES)
def test_select_runs_on_the_embeddings_device(device):
    x, labels = blobs(k=4, per=20)
    xd = x.to(device)
    for strategy in STRATEGIES:
        idx = select(xd, 4, strategy, seed=0, lengths=np.arange(80))
        assert idx.device.type == "cpu" and len(set(idx.tolist())) == 4
    assert sorted(labels[select(xd, 4, "kmeans", seed=0)].tolist()) == [0, 1, 2, 3]
    _, lab = kmeans(xd, 4)
    assert lab.device.type == torch.device(device).type


# ---- CalibrationDataset -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from calibfast._default import DefaultModelUnavailable, default_model_dir
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)
    except (ImportError, DefaultModelUnavailable, OSError) as e:  # pragma: no cover
        pytest.skip(f"no local MiniLM tokenizer: {e}")


@pytest.fixture(scope="module")
def texts():
    from calibfast._default import default_texts
    t = default_texts(200)
    # a few short and a few very long texts
    return t + ["short one", "x", " ".join(t[:30]), " ".join(t[30:45])]


def test_dataset_tokenization_equals_the_tokenizers_own(tokenizer, texts):
    ds = CalibrationDataset(texts, tokenizer, max_length=48, nsamples=None, strategy="first")
    assert len(ds) == len(texts) and ds.dropped == []
    for i, item in enumerate(ds):
        ref = tokenizer(texts[ds.ids[i]], truncation=True, max_length=48)
        assert item["input_ids"].tolist() == ref["input_ids"]
        assert item["attention_mask"].tolist() == ref["attention_mask"]
        assert item["token_type_ids"].tolist() == ref["token_type_ids"]


def test_dataset_windows_cover_every_token(tokenizer, texts):
    long_text = texts[-2]
    ds = CalibrationDataset([long_text], tokenizer, max_length=32, nsamples=None, overflow="window")
    content = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert len(ds) == math.ceil(len(content) / 30)
    got = []
    for i, item in enumerate(ds):
        ids = item["input_ids"].tolist()
        assert ids[0] == cls and ids[-1] == sep and len(ids) <= 32
        assert ds.starts[i] == 30 * i
        got += ids[1:-1]
    assert got == content
    # the first window is what truncation gives
    assert ds[0]["input_ids"].tolist() == tokenizer(long_text, truncation=True, max_length=32)["input_ids"]


def test_dataset_packing(tokenizer, texts):
    ds = CalibrationDataset(texts[:80], tokenizer, max_length=64, nsamples=10, strategy="random", seed=2, pack=True)
    assert len(ds) == 10 and all(n == 64 for n in ds.lengths) and ds.num_tokens == 640
    stream = []
    for t in texts[:80]:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    for i in range(len(ds)):
        s = ds.starts[i]
        assert ds[i]["input_ids"].tolist() == [tokenizer.cls_token_id] + stream[s:s + 62] + [tokenizer.sep_token_id]
    assert ds.pool_size == len(stream) // 62
    with pytest.raises(ValueError, match="pack=True"):
        CalibrationDataset(texts, tokenizer, pack=True, strategy="length")


def test_dataset_collate_pads_with_masks(tokenizer, texts):
    ds = CalibrationDataset(texts, tokenizer, max_length=40, nsamples=12, strategy="random", seed=0)
    batch = next(iter(ds.loader(batch_size=12)))
    T = max(ds.lengths)
    assert batch["input_ids"].shape == (12, T)
    for i, n in enumerate(ds.lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert batch["input_ids"][i, n:].eq(tokenizer.pad_token_id).all()
    ref = tokenizer(ds.texts_used(texts), truncation=True, max_length=40, padding=True, return_tensors="pt")
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[k], ref[k])


def test_dataset_reproducible_and_audited(tokenizer, texts):
    a = CalibrationDataset(texts, tokenizer, max_length=64, nsamples=32, seed=5)
    b = CalibrationDataset(list(texts), tokenizer, max_length=64, nsamples=32, seed=5)
    c = CalibrationDataset(texts, tokenizer, max_length=64, nsamples=32, seed=6)
    assert a.ids == b.ids and a.ids != c.ids
    assert len(set(a.ids)) == 32 and a.params["seed"] == 5 and a.num_tokens == sum(a.lengths)
    # length strategy: the quotas follow the buckets of the samples' token lengths
    allx = CalibrationDataset(texts, tokenizer, max_length=64, nsamples=None, strategy="first")
    buckets = length_buckets(allx.lengths)
    uniq = np.unique(buckets)
    expected = allocate([np.sum(buckets == u) for u in uniq], 32)
    got = [np.sum(length_buckets(a.lengths) == u) for u in uniq]
    assert got == expected.tolist()
    assert "strategy='length'" in repr(a)


def test_dataset_embedding_strategies(tokenizer, texts):
    emb = torch.randn(len(texts), 16, generator=torch.Generator().manual_seed(0))
    for strategy in ("cluster", "kmeans", "kcenter"):
        ds = CalibrationDataset(texts, tokenizer, max_length=64, nsamples=8, strategy=strategy, seed=1,
                                embeddings=emb)
        assert ds.ids == select(emb, 8, strategy, seed=1).tolist()
    calls = []

    def embedder(items):
        calls.append(len(items))
        return torch.stack([torch.tensor([float(len(s)), float(s.count(" "))]) for s in items])

    ds = CalibrationDataset(texts, tokenizer, max_length=64, nsamples=5, strategy="kcenter", embedder=embedder)
    assert calls == [len(texts)] and len(ds) == 5
    with pytest.raises(ValueError, match="needs embeddings"):
        CalibrationDataset(texts, tokenizer, nsamples=5, strategy="kmeans")


def test_dataset_with_a_callable_tokenizer():
    vocab = {}

    def tok(text):
        return [vocab.setdefault(w, len(vocab) + 1) for w in text.split()]

    texts = ["a b c d e f g h", "a b", "", "c d e"]
    ds = CalibrationDataset(texts, tok, max_length=3, nsamples=None, strategy="first")
    assert ds.dropped == [2]  # no tokens at all
    assert [x["input_ids"].tolist() for x in ds] == [[1, 2, 3], [1, 2], [3, 4, 5]]
    dw = CalibrationDataset(texts, tok, max_length=3, nsamples=None, strategy="first", overflow="window")
    assert [x["input_ids"].tolist() for x in dw][:3] == [[1, 2, 3], [4, 5, 6], [7, 8]]
    assert dw.starts[:3] == [0, 3, 6] and dw.ids[:3] == [0, 0, 0]
    batch = dw.collate([dw[0], dw[2]])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [7, 8, 0]]
    assert "token_type_ids" not in batch


def test_dataset_bad_input_errors(tokenizer, texts):
    with pytest.raises(ValueError, match="empty list"):
        CalibrationDataset([], tokenizer)
    with pytest.raises(TypeError, match="text #1 is a int"):
        CalibrationDataset(["ok", 3], tokenizer)
    with pytest.raises(TypeError, match="sequence of strings"):
        CalibrationDataset("just one string", tokenizer)
    with pytest.raises(ValueError, match="nsamples=500 but only 204 calibration samples"):
        CalibrationDataset(texts, tokenizer, max_length=64, nsamples=500)
    with pytest.raises(ValueError, match="unknown strategy"):
        CalibrationDataset(texts, tokenizer, strategy="best")
    with pytest.raises(ValueError, match="overflow"):
        CalibrationDataset(texts, tokenizer, overflow="drop")

    def failing(text):
        if "boom" in text:
            raise RuntimeError("cannot tokenize")
        return [1, 2, 3]

    with pytest.raises(TokenizationError, match=r"text #2 \('boom here'\): RuntimeError: cannot tokenize"):
        CalibrationDataset(["fine", "also fine", "boom here"], failing, nsamples=None)
    with pytest.raises(TokenizationError, match="text #0 .*expected ints"):
        CalibrationDataset(["x"], lambda t: ["not", "ids"], nsamples=None)
    with pytest.raises(TokenizationError, match="text #0 .*float"):
        CalibrationDataset(["x"], lambda t: torch.ones(3), nsamples=None)
    with pytest.raises(TypeError, match="tokenizer must be callable"):
        CalibrationDataset(["x"], object())
    with pytest.raises(ValueError, match="no calibration samples"):
        CalibrationDataset(["", ""], lambda t: [], nsamples=None)
