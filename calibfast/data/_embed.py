"""Embedders for selection: a callable ``texts -> [N, D] tensor``.

The default is the target model's own mean-pooled hidden states (:func:`model_embedder`): what
calibration has to cover is that model's activation space, so that is where coverage and
clusters are measured. :func:`sentence_embedder` gives the usual sentence embedding of
all-MiniLM-L6-v2 (mean pooling of the last layer, L2-normalised) for a model-independent view.
Any other callable with the same contract can be passed where an embedder is expected.
"""

import torch


def mean_pool(hidden, attention_mask=None):
    """Mean over the sequence dim of ``hidden`` [B, T, H], counting only positions where
    ``attention_mask`` [B, T] is nonzero. Returns [B, H] float32."""
    h = hidden.float()
    if attention_mask is None:
        return h.mean(1)
    m = attention_mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def pool_hidden_states(hidden_states, attention_mask=None, layers="all"):
    """Mean-pool a model's hidden states (a tuple of [B, T, H], e.g. ``output_hidden_states=True``)
    and concatenate the chosen layers: ``"all"`` (every entry, the embedding output included),
    ``"last"``, or a list of indices. Returns [B, H * len(layers)] float32."""
    hs = list(hidden_states)
    if layers == "all":
        chosen = hs
    elif layers == "last":
        chosen = hs[-1:]
    else:
        try:
            chosen = [hs[i] for i in layers]
        except (TypeError, IndexError) as e:
            raise ValueError(f"calibfast: layers must be 'all', 'last' or a list of indices into the "
                             f"{len(hs)} hidden states, got {layers!r}") from e
    if not chosen:
        raise ValueError("calibfast: no hidden states to pool")
    return torch.cat([mean_pool(h, attention_mask) for h in chosen], dim=1)


def _device_of(model):
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_embedder(model, tokenizer, *, max_length=128, batch_size=32, layers="all", normalize=False):
    """An embedder from the target model itself: each text is tokenized as at inference
    (truncated to ``max_length``), run through ``model(..., output_hidden_states=True)`` and its
    hidden states mean-pooled over real tokens, for the ``layers`` chosen (default: all of them,
    concatenated, so the embedding reflects the activations every layer's Linears will see).
    Texts are batched by length (less padding; padding never enters the means). The result is on
    the model's device, so k-means runs there too. ``normalize`` L2-normalises each row.
    """
    def embed(texts):
        texts = list(texts)
        if not texts:
            raise ValueError("calibfast: nothing to embed (no texts)")
        device = _device_of(model)
        lens = [len(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: lens[i])
        out = [None] * len(texts)
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                ids = order[s:s + batch_size]
                enc = tokenizer([texts[i] for i in ids], padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt")
                enc = {k: v.to(device) for k, v in enc.items()}
                res = model(**enc, output_hidden_states=True)
                hs = getattr(res, "hidden_states", None)
                if hs is None:
                    raise TypeError("calibfast: the model returned no hidden_states; model_embedder needs a "
                                    "Hugging Face model that accepts output_hidden_states=True")
                e = pool_hidden_states(hs, enc.get("attention_mask"), layers)
                if normalize:
                    e = torch.nn.functional.normalize(e, dim=1)
                for j, i in enumerate(ids):
                    out[i] = e[j]
        return torch.stack(out)

    return embed


def sentence_embedder(model=None, tokenizer=None, *, max_length=128, batch_size=32):
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling of the last layer, L2-normalised), from
    the embedded default model unless ``model``/``tokenizer`` are given. 384-d."""
    if model is None or tokenizer is None:
        from .._default import load_default_model

        model, tokenizer = load_default_model()
    return model_embedder(model, tokenizer, max_length=max_length, batch_size=batch_size, layers="last",
                          normalize=True)
