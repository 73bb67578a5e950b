"""Choosing calibration samples: seeded random, length-stratified, cluster-stratified, k-means
medoid-like picks and greedy k-center coverage, plus near-duplicate removal.

Everything here works on plain tensors: ``embeddings`` is a ``[N, D]`` float tensor (or numpy
array) with one row per candidate sample; selection returns indices into it. k-means and
k-center run in torch on the embeddings' device (so on the GPU when the embeddings are there), in
float32, with a seeded CPU ``torch.Generator`` for every random choice.

Why torch rather than scikit-learn or faiss: the pools are small (thousands of rows), k is at most
the number of calibration samples, the embeddings usually come straight from a model that may be
on a GPU, and torch is already the one dependency; a few dozen Lloyd iterations on a [N, D] x
[D, k] matmul take milliseconds there. A library would add a dependency, a device copy and its
own seeding conventions for no gain at this size.
"""

import math

import numpy as np
import torch

STRATEGIES = ("random", "length", "cluster", "kmeans", "kcenter")
ALLOCATIONS = ("proportional", "equal")


# ---- input checks ------------------------------------------------------------------------------

def _as_embeddings(embeddings):
    """[N, D] float tensor (float32 unless float64 was given), or None."""
    if embeddings is None:
        return None
    if isinstance(embeddings, np.ndarray):
        embeddings = torch.from_numpy(np.ascontiguousarray(embeddings))
    elif not isinstance(embeddings, torch.Tensor):
        try:
            embeddings = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        except (TypeError, ValueError) as e:
            raise TypeError(f"calibfast: embeddings must be a [N, D] tensor or array, got "
                            f"{type(embeddings).__name__}") from e
    if embeddings.dim() == 1 and embeddings.numel() == 0:
        embeddings = embeddings.reshape(0, 0)
    if embeddings.dim() != 2:
        raise ValueError(f"calibfast: embeddings must be 2-d [N, D] (one row per sample), got shape "
                         f"{list(embeddings.shape)}")
    if not embeddings.is_floating_point():
        embeddings = embeddings.float()
    elif embeddings.dtype not in (torch.float32, torch.float64):
        embeddings = embeddings.float()
    return embeddings.detach()


def _as_lengths(lengths, n_pool=None):
    if lengths is None:
        return None
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.detach().cpu().numpy()
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"calibfast: lengths must be 1-d (one per sample), got shape {list(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"calibfast: lengths must be numbers, got dtype {arr.dtype}")
    if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr < 0)):
        raise ValueError("calibfast: lengths must be finite and >= 0")
    if n_pool is not None and arr.size != n_pool:
        raise ValueError(f"calibfast: lengths has {arr.size} entries but the pool has {n_pool} samples")
    return arr


def _check_n(n, n_pool, what="the pool"):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"calibfast: n must be an int, got {type(n).__name__}")
    n = int(n)
    if n < 0:
        raise ValueError(f"calibfast: n must be >= 0, got {n}")
    if n_pool == 0:
        raise ValueError("calibfast: cannot select from an empty pool (0 samples)")
    if n > n_pool:
        raise ValueError(f"calibfast: cannot select n={n} distinct samples from {what} of {n_pool}")
    return n


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"calibfast: seed must be an int, got {type(seed).__name__}")
    return int(seed)


def _generator(seed):
    return torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)


def _randperm(n, gen):
    return torch.randperm(n, generator=gen)


# ---- allocation and stratified draws ------------------------------------------------------------

def allocate(sizes, n, allocation="proportional"):
    """How many of ``n`` draws each stratum gets.

    ``"proportional"``: in proportion to the stratum sizes, rounded by largest remainder (Hamilton):
    every stratum gets ``floor(n * size / total)`` and the draws left go one each to the largest
    fractional parts (ties: the lower stratum index). ``"equal"``: the same number per non-empty
    stratum, the remainder again one each from the lowest index.

    Empty strata get nothing, and their share goes to the others; a stratum never gets more than
    it holds, and what it cannot take is shared out again among those with room left, by the same
    rule (proportional to size, or equally), until all ``n`` are placed. The result sums to ``n``
    exactly. Returns an int64 numpy array.
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"calibfast: allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.ndim != 1 or np.any(sizes < 0):
        raise ValueError("calibfast: stratum sizes must be a 1-d array of counts >= 0")
    total = int(sizes.sum())
    n = _check_n(n, total, "strata holding")
    quota = np.zeros_like(sizes)
    remaining = n
    while remaining > 0:
        room = sizes - quota
        open_ = room > 0
        weights = np.where(open_, sizes if allocation == "proportional" else 1, 0).astype(np.float64)
        share = remaining * weights / weights.sum()
        base = np.minimum(np.floor(share).astype(np.int64), room)
        quota += base
        remaining -= int(base.sum())
        if remaining <= 0:
            break
        frac = share - np.floor(share)
        cand = np.flatnonzero((sizes - quota) > 0)
        # largest fractional part first, then the lower index (a stable sort keeps index order)
        order = cand[np.argsort(-frac[cand], kind="stable")]
        give = order[:remaining]
        quota[give] += 1
        remaining -= len(give)
    return quota


def stratified(labels, n, seed=0, allocation="proportional"):
    """``n`` distinct indices drawn at random within strata given by ``labels`` (any hashable
    values, one per sample), with :func:`allocate`'s quotas. Strata are visited in sorted label
    order and the draws within each are seeded, so the result depends only on the inputs and
    ``seed``. Returns a sorted int64 tensor."""
    labels = np.asarray(labels)
    n = _check_n(n, labels.size)
    seed = _check_seed(seed)
    uniq, inv = np.unique(labels, return_inverse=True)
    inv = inv.reshape(-1)
    sizes = np.bincount(inv, minlength=len(uniq))
    quota = allocate(sizes, n, allocation)
    gen = _generator(seed)
    picks = []
    for s in range(len(uniq)):
        members = np.flatnonzero(inv == s)
        q = int(quota[s])
        # Draw even for q == 0, so stratum s's draws do not depend on the quotas of the others.
        perm = _randperm(len(members), gen).numpy()
        picks.append(members[perm[:q]])
    out = np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(out.astype(np.int64))


def length_buckets(lengths, buckets=None):
    """Bucket id of each length.

    ``buckets=None``: powers of two, bucket ``b`` holding lengths in ``[2^b, 2^(b+1))`` (length 0
    goes with 1). An int ``B``: B buckets evenly spaced in log-length between the smallest and the
    largest length. A sequence of ascending edges ``[e0, e1, ..., eK]``: bucket i is
    ``[e_i, e_(i+1))``; lengths below ``e0`` join the first bucket and lengths from the last edge
    up join the last, so no sample is ever dropped. Returns an int64 numpy array.
    """
    lengths = _as_lengths(lengths)
    if buckets is None:
        return np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    if isinstance(buckets, (int, np.integer)) and not isinstance(buckets, bool):
        if buckets < 1:
            raise ValueError(f"calibfast: buckets must be >= 1, got {buckets}")
        if lengths.size == 0:
            return np.zeros(0, dtype=np.int64)
        lo, hi = np.log(max(lengths.min(), 1)), np.log(max(lengths.max(), 1))
        if hi <= lo:
            return np.zeros(lengths.size, dtype=np.int64)
        pos = (np.log(np.maximum(lengths, 1)) - lo) / (hi - lo) * buckets
        return np.clip(np.floor(pos), 0, buckets - 1).astype(np.int64)
    edges = np.asarray(buckets, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError("calibfast: bucket edges must be a strictly ascending sequence of at least 2 numbers")
    ids = np.searchsorted(edges, lengths, side="right") - 1
    return np.clip(ids, 0, edges.size - 2).astype(np.int64)


# ---- geometry ---------------------------------------------------------------------------------

def _sq_dists(x, c, x_sq=None):
    """Squared Euclidean distances [N, K] (clamped at 0)."""
    if x_sq is None:
        x_sq = (x * x).sum(1)
    d = x_sq[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
    return d.clamp_min_(0.0)


def kmeans(embeddings, k, seed=0, iters=100, tol=1e-6):
    """Lloyd's k-means with k-means++ seeding, in torch on the embeddings' device.

    Empty clusters (possible with duplicate points) are re-seeded at the point farthest from its
    centre. Stops when no label changes or the centres move less than ``tol`` (relative to the
    data's scale), or after ``iters`` iterations. Deterministic for a seed on a given device.

    Returns ``(centers [k, D], labels [N] int64)``, both on the embeddings' device.
    """
    x = _as_embeddings(embeddings)
    N = x.shape[0]
    k = _check_n(k, N)
    if k == 0:
        return x.new_zeros(0, x.shape[1]), torch.zeros(N, dtype=torch.int64, device=x.device)
    seed = _check_seed(seed)
    gen = _generator(seed)
    x = x.float() if x.dtype != torch.float64 else x
    x_sq = (x * x).sum(1)
    # k-means++: the first centre uniformly, each next one with probability ~ D^2.
    idx = [int(torch.randint(N, (1,), generator=gen))]
    d2 = _sq_dists(x, x[idx[0]][None], x_sq)[:, 0]
    for _ in range(1, k):
        w = d2.double().cpu()
        total = float(w.sum())
        if total > 0 and math.isfinite(total):
            i = int(torch.multinomial(w / total, 1, generator=gen))
        else:  # every point sits on a centre already (duplicates): any point not yet chosen
            free = torch.ones(N, dtype=torch.bool)
            free[idx] = False
            cand = torch.nonzero(free).flatten()
            i = int(cand[torch.randint(len(cand), (1,), generator=gen)])
        idx.append(i)
        d2 = torch.minimum(d2, _sq_dists(x, x[i][None], x_sq)[:, 0])
    centers = x[idx].clone()
    scale = float(x.std()) if N > 1 else 1.0
    labels = None
    for _ in range(max(1, int(iters))):
        dist = _sq_dists(x, centers, x_sq)
        new_labels = dist.argmin(1)
        counts = torch.bincount(new_labels, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, new_labels, x)
        new_centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].to(x.dtype), centers)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            own = dist.gather(1, new_labels[:, None])[:, 0].clone()
            for c in empty:
                far = int(own.argmax())
                new_centers[c] = x[far]
                own[far] = -1.0
        shift = float((new_centers - centers).norm(dim=1).max())
        same = labels is not None and bool((new_labels == labels).all())
        centers, labels = new_centers, new_labels
        if not empty and (same or shift <= tol * max(scale, 1e-30)):
            break
    labels = _sq_dists(x, centers, x_sq).argmin(1)
    return centers, labels


def kcenter(embeddings, n, seed=0):
    """Greedy farthest-first traversal: a seeded random first point, then each time the point
    farthest from everything chosen so far (ties: the lowest index). A 2-approximation of the
    smallest covering radius. Returns the indices in the order chosen (int64, CPU)."""
    x = _as_embeddings(embeddings)
    N = x.shape[0]
    n = _check_n(n, N)
    seed = _check_seed(seed)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    gen = _generator(seed)
    x_sq = (x * x).sum(1)
    first = int(torch.randint(N, (1,), generator=gen))
    chosen = [first]
    mind = _sq_dists(x, x[first][None], x_sq)[:, 0]
    mind[first] = -1.0
    for _ in range(1, n):
        i = int(mind.argmax())
        chosen.append(i)
        mind = torch.minimum(mind, _sq_dists(x, x[i][None], x_sq)[:, 0])
        mind[chosen] = -1.0
    return torch.tensor(chosen, dtype=torch.int64)


def coverage_radius(embeddings, indices):
    """max over the pool of the Euclidean distance to the nearest selected sample (what k-center
    minimises). Returns a float."""
    x = _as_embeddings(embeddings)
    idx = torch.as_tensor(indices, dtype=torch.int64).to(x.device)
    if idx.numel() == 0:
        return math.inf
    return float(_sq_dists(x, x[idx]).min(1).values.max().sqrt())


def _nearest_distinct(x, centers):
    """For each centre in turn, the nearest point not picked for an earlier centre."""
    d = _sq_dists(x, centers)
    taken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    out = []
    for c in range(centers.shape[0]):
        dc = d[:, c].masked_fill(taken, math.inf)
        i = int(dc.argmin())
        out.append(i)
        taken[i] = True
    return torch.tensor(out, dtype=torch.int64)


def deduplicate(embeddings, threshold=0.95, block=1024):
    """Near-duplicate removal: walk the samples in index order and keep one unless its cosine
    similarity to an already kept sample is >= ``threshold``. Returns the kept indices (sorted,
    int64, CPU). Exact duplicates are removed by any threshold <= 1."""
    x = _as_embeddings(embeddings)
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"calibfast: the near-duplicate threshold is a cosine similarity in (0, 1], got {threshold}")
    N = x.shape[0]
    if N == 0:
        return torch.zeros(0, dtype=torch.int64)
    xn = torch.nn.functional.normalize(x.float(), dim=1)
    thr = float(threshold) - 1e-6  # so that exact duplicates (cos = 1 up to rounding) always go
    kept = torch.zeros(N, dtype=torch.bool, device=x.device)
    for start in range(0, N, block):
        blk = xn[start:start + block]
        # against everything kept before this block
        dup = torch.zeros(blk.shape[0], dtype=torch.bool, device=x.device)
        if start:
            prev = xn[:start][kept[:start]]
            if prev.shape[0]:
                dup = (blk @ prev.T).max(1).values >= thr
        sim = blk @ blk.T
        for i in range(blk.shape[0]):  # within the block, in order
            if dup[i]:
                continue
            kept[start + i] = True
            later = sim[i, i + 1:] >= thr
            dup[i + 1:] |= later
    return torch.nonzero(kept).flatten().cpu()


# ---- the entry point --------------------------------------------------------------------------

def default_clusters(n):
    """k for the "cluster" strategy: ceil(sqrt(n)), so each cluster gets sqrt(n) draws on average."""
    return max(1, math.ceil(math.sqrt(n)))


def select(embeddings, n, strategy="random", seed=0, lengths=None, *, k=None, buckets=None,
           allocation="proportional", dedup=None, iters=100):
    """Choose ``n`` calibration samples from a pool.

    Args:
        embeddings: ``[N, D]`` tensor/array, one row per candidate (e.g. from
            :func:`calibfast.data.model_embedder`). May be ``None`` for ``"random"`` and
            ``"length"`` when ``lengths`` is given (then N = ``len(lengths)``).
        n: how many to choose (0 <= n <= N).
        strategy:
            ``"random"``: uniform without replacement, seeded.
            ``"length"``: stratified by ``lengths`` (:func:`length_buckets` with ``buckets``),
            quotas by :func:`allocate` (``allocation``), random within buckets.
            ``"cluster"``: k-means with ``k`` clusters (default ``ceil(sqrt(n))``), then random
            draws within clusters in proportion to their size (largest remainder).
            ``"kmeans"``: k-means with k = n, then the sample nearest each centre (distinct: a
            centre whose nearest sample was taken gets its nearest free one).
            ``"kcenter"``: greedy farthest-first traversal from a seeded random start (covers the
            embedding space: minimises, within a factor 2, the largest distance from any sample
            to its nearest chosen one).
        seed: everything random derives from it; same inputs and seed, same result (on a device).
        lengths: token lengths, required by ``"length"``.
        k: clusters for ``"cluster"``.
        buckets, allocation: for ``"length"`` (see :func:`length_buckets`, :func:`allocate`).
        dedup: ``None`` or a cosine threshold: drop near-duplicates (:func:`deduplicate`) first.
        iters: k-means iterations at most.

    Returns:
        ``n`` distinct indices into the pool, sorted, as an int64 CPU tensor.

    Raises ValueError for an empty pool, ``n`` larger than the pool (after de-duplication), an
    unknown strategy, missing or mismatched ``lengths``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"calibfast: unknown selection strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    seed = _check_seed(seed)
    x = _as_embeddings(embeddings)
    if x is None:
        if strategy not in ("random", "length"):
            raise ValueError(f"calibfast: strategy {strategy!r} needs embeddings")
        if lengths is None:
            raise ValueError("calibfast: give embeddings or lengths (the pool size comes from one of them)")
        N = len(lengths)
    else:
        N = x.shape[0]
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError("calibfast: embeddings contain NaN or Inf")
    lens = _as_lengths(lengths, N)
    if strategy == "length" and lens is None:
        raise ValueError("calibfast: strategy 'length' needs lengths (one token count per sample)")
    _check_n(n, N)

    pool = torch.arange(N)
    if dedup is not None:
        if x is None:
            raise ValueError("calibfast: dedup needs embeddings")
        pool = deduplicate(x, dedup)
        x = x[pool.to(x.device)]
        lens = lens[pool.numpy()] if lens is not None else None
    n = _check_n(n, len(pool), "the pool" if dedup is None else
                 f"the pool left after near-duplicate removal (threshold {dedup}, {N - len(pool)} removed),")
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)

    M = len(pool)
    if strategy == "random":
        idx = _randperm(M, _generator(seed))[:n]
    elif strategy == "length":
        idx = stratified(length_buckets(lens, buckets), n, seed, allocation)
    elif strategy == "cluster":
        kk = default_clusters(n) if k is None else int(k)
        if not 1 <= kk <= M:
            raise ValueError(f"calibfast: k must be in [1, {M}], got {kk}")
        _, labels = kmeans(x, kk, seed=seed, iters=iters)
        idx = stratified(labels.cpu().numpy(), n, seed, "proportional")
    elif strategy == "kmeans":
        centers, _ = kmeans(x, n, seed=seed, iters=iters)
        idx = _nearest_distinct(x.to(centers.dtype), centers)
    else:  # kcenter
        idx = kcenter(x, n, seed=seed)
    out = pool[idx.cpu()]
    return torch.sort(out).values
