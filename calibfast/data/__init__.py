"""Calibration data: preparation (:class:`CalibrationDataset`) and representative selection
(:func:`select`).

    from calibfast.data import CalibrationDataset, select, model_embedder

    ds = CalibrationDataset(texts, tokenizer, max_length=512, nsamples=128, strategy="length", seed=0)
    for batch in ds.loader(batch_size=8):
        model(**batch)
    ds.ids            # which texts were used (reproducible for the same texts and seed)

    emb = model_embedder(model, tokenizer)(texts)        # [N, D], the model's own activations
    idx = select(emb, 128, strategy="kcenter", seed=0)   # 128 distinct indices into texts

Strategies: "random", "length" (stratified by token length), "cluster" (k-means with k << n,
random draws within clusters in proportion to their size), "kmeans" (k = n, the sample nearest
each centre), "kcenter" (greedy farthest-first coverage). k-means and k-center run in torch on the
embeddings' device (see ``_selection``'s docstring for why not a library).
"""

from ._dataset import DATASET_STRATEGIES, OVERFLOW, CalibrationDataset, TokenizationError
from ._embed import mean_pool, model_embedder, pool_hidden_states, sentence_embedder
from ._selection import (ALLOCATIONS, STRATEGIES, allocate, coverage_radius, deduplicate, default_clusters,
                         kcenter, kmeans, length_buckets, select, stratified)

__all__ = [
    "ALLOCATIONS",
    "CalibrationDataset",
    "DATASET_STRATEGIES",
    "OVERFLOW",
    "STRATEGIES",
    "TokenizationError",
    "allocate",
    "coverage_radius",
    "deduplicate",
    "default_clusters",
    "kcenter",
    "kmeans",
    "length_buckets",
    "mean_pool",
    "model_embedder",
    "pool_hidden_states",
    "select",
    "sentence_embedder",
    "stratified",
]
