"""CalibrationDataset: texts -> tokenized calibration samples, chosen reproducibly."""

from collections.abc import Mapping

import numpy as np
import torch

from ._selection import STRATEGIES, _check_seed, select

OVERFLOW = ("truncate", "window")
DATASET_STRATEGIES = ("first",) + STRATEGIES


class TokenizationError(RuntimeError):
    """The tokenizer failed on a text, or returned something that is not a sequence of token ids."""


def _preview(text, n=60):
    s = repr(text)
    return s if len(s) <= n else s[:n - 3] + "..."


def _ids_from(out):
    """A flat list of ints from what a tokenizer returned (a mapping with input_ids, a list, a
    1-d tensor or array, or one of those wrapped in a batch of one)."""
    if isinstance(out, Mapping) or (hasattr(out, "keys") and hasattr(out, "__getitem__")):
        if "input_ids" not in out:
            raise TypeError(f"it returned a mapping without 'input_ids' (keys {list(out.keys())[:6]})")
        out = out["input_ids"]
    if isinstance(out, torch.Tensor):
        if out.dim() == 2 and out.shape[0] == 1:
            out = out[0]
        if out.dim() != 1 or out.is_floating_point() or out.is_complex():
            raise TypeError(f"it returned a tensor of shape {list(out.shape)} and dtype {out.dtype}, "
                            "expected 1-d integer token ids")
        return [int(v) for v in out.tolist()]
    if isinstance(out, np.ndarray):
        return _ids_from(torch.from_numpy(out))
    if isinstance(out, (list, tuple)):
        if len(out) == 1 and isinstance(out[0], (list, tuple)):
            out = out[0]
        ids = []
        for v in out:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"it returned a sequence containing {type(v).__name__}, expected ints")
            ids.append(int(v))
        return ids
    raise TypeError(f"it returned {type(out).__name__}, expected token ids")


class _Tokenizer:
    """Uniform access to a Hugging Face tokenizer or a plain callable ``text -> ids``."""

    def __init__(self, tokenizer):
        if not callable(tokenizer):
            raise TypeError(f"calibfast: tokenizer must be callable (a Hugging Face tokenizer or a function "
                            f"text -> token ids), got {type(tokenizer).__name__}")
        self.tok = tokenizer
        self.hf = callable(getattr(tokenizer, "num_special_tokens_to_add", None)) and \
            hasattr(tokenizer, "model_input_names")
        self._affixes = None

    def _call(self, text, i, **kw):
        try:
            out = self.tok(text, **kw) if self.hf else self.tok(text)
            return _ids_from(out)
        except Exception as e:  # noqa: BLE001 - re-raised with the text that caused it
            raise TokenizationError(f"calibfast: the tokenizer failed on text #{i} ({_preview(text)}): "
                                    f"{type(e).__name__}: {e}") from e

    def full(self, texts):
        """Each text as the tokenizer encodes it at inference, special tokens included, untruncated."""
        if self.hf and texts:
            try:
                out = self.tok(list(texts), add_special_tokens=True, truncation=False, verbose=False)
                ids = out["input_ids"]
                if len(ids) == len(texts):
                    return [_ids_from(x) for x in ids]
            except Exception:  # noqa: BLE001 - redo one by one to name the text that fails
                pass
        return [self._call(t, i, add_special_tokens=True, truncation=False, verbose=False)
                for i, t in enumerate(texts)]

    def truncated(self, text, i, max_length):
        if self.hf:
            return self._call(text, i, truncation=True, max_length=max_length)
        return self._call(text, i)[:max_length]

    def content(self, text, i):
        """The text's tokens without special tokens (HF); the callable's output otherwise."""
        if self.hf:
            return self._call(text, i, add_special_tokens=False, verbose=False)
        return self._call(text, i)

    def affixes(self, full, content):
        """(prefix, suffix): the special tokens around the content, found from one example."""
        if not self.hf:
            return [], []
        if not content:  # nothing to locate the text by
            if self._affixes is None:
                raise TokenizationError("calibfast: cannot find the tokenizer's special tokens from an empty text")
            return self._affixes
        extra = len(full) - len(content)
        for p in range(max(extra, 0) + 1):
            if full[p:p + len(content)] == content and len(full) - p - len(content) >= 0:
                pre, suf = full[:p], full[p + len(content):]
                if self._affixes is None:
                    self._affixes = (pre, suf)
                elif (pre, suf) != self._affixes:
                    break
                return pre, suf
        raise TokenizationError("calibfast: cannot split long texts into windows with this tokenizer: its "
                                "output with special tokens is not a fixed prefix + the text's tokens + a "
                                "fixed suffix; use overflow='truncate'")

    @property
    def pad_id(self):
        if self.hf:
            p = getattr(self.tok, "pad_token_id", None)
            return 0 if p is None else int(p)
        return 0

    @property
    def padding_side(self):
        return getattr(self.tok, "padding_side", "right") if self.hf else "right"

    @property
    def wants_token_type_ids(self):
        return self.hf and "token_type_ids" in getattr(self.tok, "model_input_names", ())

    def separator(self):
        if not self.hf:
            return []
        for name in ("eos_token_id", "sep_token_id"):
            v = getattr(self.tok, name, None)
            if v is not None:
                return [int(v)]
        return []

    def decode(self, ids):
        if not self.hf or not callable(getattr(self.tok, "decode", None)):
            raise TypeError("calibfast: embedding windows needs a tokenizer with decode(); pass embeddings instead")
        return self.tok.decode(ids, skip_special_tokens=True)


class CalibrationDataset(torch.utils.data.Dataset):
    """Tokenized calibration samples chosen from ``texts``, reproducibly.

    Tokenization is the tokenizer's own, as at inference: a Hugging Face tokenizer is called with
    its special tokens (``add_special_tokens=True``); a text longer than ``max_length`` tokens is
    either cut by the tokenizer itself (``overflow="truncate"``: ``tokenizer(text, truncation=True,
    max_length=max_length)``, so its truncation side applies) or split into consecutive windows
    (``overflow="window"``: the text's tokens in chunks of ``max_length`` minus the special tokens,
    each wrapped in the same special tokens; every window is a candidate sample, the last one may
    be shorter). A plain callable ``text -> ids`` (a list, a 1-d tensor or a mapping with
    ``input_ids``) is taken as is: truncation keeps its first ``max_length`` ids, windows are
    consecutive chunks of them. Texts that give fewer than ``min_length`` tokens are left out and
    listed in ``.dropped``; no text is left out for being long.

    ``pack=True`` instead concatenates all texts (their tokens without special tokens, each
    followed by the EOS or SEP token when the tokenizer has one), cuts the stream into windows of
    exactly ``max_length`` tokens, special tokens included, and drops the last partial window, as
    the AWQ and GPTQ loaders do; the candidates are those windows.

    ``nsamples`` candidates are then chosen with ``strategy``:

    - ``"length"`` (default): stratified by token length (:func:`calibfast.data.length_buckets`
      with ``buckets``; power-of-two buckets by default), quotas proportional to the buckets'
      sizes or equal (``allocation``), an empty bucket's quota going to the others, random within
      buckets;
    - ``"random"``: uniform without replacement; ``"first"``: the first ``nsamples``;
    - ``"cluster"``, ``"kmeans"``, ``"kcenter"``: by embeddings (see :func:`calibfast.data.select`):
      ``embeddings`` with one row per text (or per candidate), or ``embedder``, a callable
      ``texts -> [N, D]`` applied to the candidates (windows are decoded back to text first).

    ``nsamples=None`` takes every candidate. Everything random derives from ``seed``.

    Attributes (for audit and reruns): ``ids`` (the source text's index per sample), ``starts``
    (each sample's token offset in its text without special tokens, or in the packed stream),
    ``candidates`` (indices of the chosen candidates), ``lengths``, ``num_tokens``, ``pool_size``
    (number of candidates), ``dropped``, ``params`` (the arguments that produced it).
    Items are dicts of 1-d tensors (``input_ids``, ``attention_mask``, and ``token_type_ids`` when
    the tokenizer uses them); :meth:`collate` pads a list of them into a batch and :meth:`loader`
    gives a DataLoader that uses it.
    """

    def __init__(self, texts, tokenizer, max_length=2048, nsamples=512, strategy="length", seed=0, *,
                 overflow="truncate", pack=False, buckets=None, allocation="proportional", min_length=1,
                 embeddings=None, embedder=None, dedup=None, k=None):
        if isinstance(texts, str) or not hasattr(texts, "__len__"):
            raise TypeError("calibfast: texts must be a sequence of strings (a list), not "
                            f"{type(texts).__name__}")
        texts = list(texts)
        if not texts:
            raise ValueError("calibfast: no texts to calibrate on (empty list)")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"calibfast: text #{i} is a {type(t).__name__}, expected str")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"calibfast: max_length must be an int >= 1, got {max_length!r}")
        if nsamples is not None and (isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 0):
            raise ValueError(f"calibfast: nsamples must be an int >= 0 or None (all), got {nsamples!r}")
        if strategy not in DATASET_STRATEGIES:
            raise ValueError(f"calibfast: unknown strategy {strategy!r}; choose one of {list(DATASET_STRATEGIES)}")
        if overflow not in OVERFLOW:
            raise ValueError(f"calibfast: overflow must be one of {OVERFLOW}, got {overflow!r}")
        if pack and strategy == "length":
            raise ValueError("calibfast: strategy='length' means nothing with pack=True (every packed window has "
                             "the same length); use 'random' or 'first'")
        seed = _check_seed(seed)
        self.tokenizer = tokenizer
        self._tok = _Tokenizer(tokenizer)
        self.max_length = max_length
        self.params = dict(max_length=max_length, nsamples=nsamples, strategy=strategy, seed=seed,
                           overflow=overflow, pack=pack, buckets=buckets, allocation=allocation,
                           min_length=min_length, dedup=dedup, k=k, num_texts=len(texts))

        full = self._tok.full(texts)
        self.dropped = [i for i, f in enumerate(full) if len(f) < max(min_length, 1)]
        dropped = set(self.dropped)
        # candidates: (text id, start offset, ids)
        units = []
        if pack:
            units = self._pack(texts, full, dropped, max_length)
        else:
            for i, (t, f) in enumerate(zip(texts, full)):
                if i in dropped:
                    continue
                if len(f) <= max_length:
                    units.append((i, 0, f))
                elif overflow == "truncate":
                    units.append((i, 0, self._tok.truncated(t, i, max_length)))
                else:
                    units.extend((i, s, ids) for s, ids in self._windows(t, i, f, max_length))
        self.pool_size = len(units)
        if self.pool_size == 0:
            raise ValueError(f"calibfast: no calibration samples: all {len(texts)} texts gave fewer than "
                             f"{max(min_length, 1)} tokens" if not pack else
                             f"calibfast: no calibration samples: the {len(texts)} texts hold fewer than "
                             f"max_length={max_length} tokens in all, not one packed window")
        n = self.pool_size if nsamples is None else nsamples
        if n > self.pool_size:
            raise ValueError(f"calibfast: nsamples={n} but only {self.pool_size} calibration samples are available "
                             f"(from {len(texts)} texts, max_length={max_length}, "
                             f"{'packed' if pack else 'overflow=' + repr(overflow)}); lower nsamples, or pass "
                             "nsamples=None to take them all")
        unit_lengths = np.array([len(u[2]) for u in units], dtype=np.int64)
        if strategy == "first" or nsamples is None:
            chosen = torch.arange(n)
        elif strategy in ("random", "length"):
            emb = self._unit_embeddings(texts, units, embeddings, embedder, pack) if dedup is not None else None
            chosen = select(emb, n, strategy, seed, lengths=unit_lengths, buckets=buckets,
                            allocation=allocation, dedup=dedup)
        else:
            emb = self._unit_embeddings(texts, units, embeddings, embedder, pack)
            if emb is None:
                raise ValueError(f"calibfast: strategy {strategy!r} needs embeddings (one row per text) or an "
                                 "embedder (a callable texts -> [N, D] tensor)")
            chosen = select(emb, n, strategy, seed, lengths=unit_lengths, k=k, dedup=dedup)
        chosen = chosen.tolist()
        self.candidates = chosen
        self.ids = [units[c][0] for c in chosen]
        self.starts = [units[c][1] for c in chosen]
        self._input_ids = [torch.tensor(units[c][2], dtype=torch.int64) for c in chosen]
        self.lengths = [len(units[c][2]) for c in chosen]
        self.num_tokens = int(sum(self.lengths))

    # -- candidates -----------------------------------------------------------------------------
    def _windows(self, text, i, full, L):
        content = self._tok.content(text, i)
        pre, suf = self._tok.affixes(full, content)
        chunk = L - len(pre) - len(suf)
        if chunk < 1:
            raise ValueError(f"calibfast: max_length={L} leaves no room for text between the tokenizer's "
                             f"{len(pre) + len(suf)} special tokens")
        return [(s, pre + content[s:s + chunk] + suf) for s in range(0, len(content), chunk)]

    def _pack(self, texts, full, dropped, L):
        sep = self._tok.separator()
        stream, owner = [], []
        pre = suf = []
        for i, t in enumerate(texts):
            if i in dropped:
                continue
            c = self._tok.content(t, i)
            if self._tok.hf and c and self._tok._affixes is None:
                pre, suf = self._tok.affixes(full[i], c)
            piece = c + sep
            stream.extend(piece)
            owner.extend([i] * len(piece))
        if self._tok._affixes is not None:
            pre, suf = self._tok._affixes
        chunk = L - len(pre) - len(suf)
        if chunk < 1:
            raise ValueError(f"calibfast: max_length={L} leaves no room for text between the tokenizer's "
                             f"{len(pre) + len(suf)} special tokens")
        units = []
        for s in range(0, len(stream) - chunk + 1, chunk):
            units.append((owner[s], s, pre + stream[s:s + chunk] + suf))
        return units

    def _unit_embeddings(self, texts, units, embeddings, embedder, pack):
        if embeddings is not None:
            emb = embeddings if isinstance(embeddings, torch.Tensor) else torch.as_tensor(np.asarray(embeddings))
            if emb.dim() != 2:
                raise ValueError(f"calibfast: embeddings must be 2-d [N, D], got shape {list(emb.shape)}")
            if emb.shape[0] == len(units):
                return emb
            if emb.shape[0] == len(texts) and not pack:
                return emb[torch.tensor([u[0] for u in units], device=emb.device)]
            per_text = "" if pack else f"one per text ({len(texts)}) or "
            raise ValueError(f"calibfast: embeddings have {emb.shape[0]} rows; expected {per_text}one per "
                             f"candidate sample ({len(units)})")
        if embedder is None:
            return None
        whole = all(s == 0 for _, s, _ in units) and not pack and len({u[0] for u in units}) == len(units)
        items = [texts[u[0]] if whole else self._tok.decode(u[2]) for u in units]
        emb = embedder(items)
        emb = emb if isinstance(emb, torch.Tensor) else torch.as_tensor(np.asarray(emb))
        if emb.dim() != 2 or emb.shape[0] != len(units):
            raise ValueError(f"calibfast: the embedder returned shape {list(emb.shape)} for {len(units)} samples")
        return emb

    # -- Dataset --------------------------------------------------------------------------------
    def __len__(self):
        return len(self._input_ids)

    def __getitem__(self, i):
        ids = self._input_ids[i]
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self._tok.wants_token_type_ids:
            item["token_type_ids"] = torch.zeros_like(ids)
        return item

    def collate(self, items):
        """Pad a list of items to the longest (with the tokenizer's pad token and padding side)
        into a batch: a dict of [B, T] int64 tensors with ``attention_mask`` 0 on padding."""
        if not items:
            raise ValueError("calibfast: cannot collate an empty batch")
        T = max(len(it["input_ids"]) for it in items)
        left = self._tok.padding_side == "left"
        out = {}
        for key in items[0]:
            fill = self._tok.pad_id if key == "input_ids" else 0
            rows = []
            for it in items:
                v = it[key]
                pad = v.new_full((T - len(v),), fill)
                rows.append(torch.cat([pad, v]) if left else torch.cat([v, pad]))
            out[key] = torch.stack(rows)
        return out

    def loader(self, batch_size=8, **kwargs):
        """A ``torch.utils.data.DataLoader`` over the samples, in order, batched with :meth:`collate`."""
        kwargs.setdefault("shuffle", False)
        return torch.utils.data.DataLoader(self, batch_size=batch_size, collate_fn=self.collate, **kwargs)

    def texts_used(self, texts):
        """The source text of each sample (``texts`` being the list the dataset was built from)."""
        return [texts[i] for i in self.ids]

    def __repr__(self):
        p = self.params
        return (f"CalibrationDataset({len(self)} samples of {self.pool_size} candidates from {p['num_texts']} texts, "
                f"{self.num_tokens} tokens, strategy={p['strategy']!r}, seed={p['seed']}, "
                f"max_length={p['max_length']}, {'packed' if p['pack'] else 'overflow=' + repr(p['overflow'])})")
