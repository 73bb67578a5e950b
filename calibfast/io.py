"""A file format for calibration statistics: safetensors tensors plus a JSON description.

    from calibfast import io
    io.save("stats.safetensors", collector, metadata={"model": "all-MiniLM-L6-v2", "data": ["pydoc"]})
    collector = io.load("stats.safetensors")           # a Collector (or a ChannelStats)
    io.read_metadata("stats.safetensors")["user"]      # {"model": ..., "data": [...]}

The file is a plain safetensors file (``safetensors.torch.save_file``), so any safetensors reader
can open it. Its header metadata (string -> string) holds:

``format``            ``"calibfast-stats"``
``format_version``    ``"1"``
``calibfast_version`` / ``torch_version``   the versions that wrote it
``kind``              ``"channel_stats"`` or ``"collector"``
``contents``          JSON: for ``channel_stats`` ``{"axis", "bins", "channel_bins", "num_channels"}``;
                      for ``collector`` ``{"capture", "inputs": [entry...], "outputs": [entry...],
                      "hessians": [{"name", "num_channels"}...]}``, each entry
                      ``{"name", "axis", "bins", "channel_bins", "num_channels"}``
                      (``num_channels`` is null for a statistic that saw no data: it has no tensors)
``user``              JSON: the ``metadata`` passed to :func:`save` (model name, data ids, options...)

Tensors, named ``<prefix><key>`` with the prefix ``""`` for a lone ChannelStats and
``"inputs/<module name>/"`` / ``"outputs/<module name>/"`` in a collector, and ``key`` one of:
``min``, ``max``, ``absmin`` (float32 [C]), ``sum``, ``sum_abs``, ``sum_sq`` (float64 [C]),
``count``, ``nan_count``, ``inf_count`` (int64 [C]), ``hist`` (int64 [bins]), ``hist_exp``
(int64 [2]), ``channel_hist`` (int64 [C, channel_bins], [0, 0] without per-channel histograms),
``channel_hist_exp`` (int64 [2, C]) -- the names of :meth:`ChannelStats.state_dict`. A collector's
input Hessians (``collect(hessian=True)``) are ``hessians/<module name>/xtx`` (float32 [C, C]) and
``hessians/<module name>/count`` (int64, 0-d).

Loading reads JSON and raw tensor bytes only: it never unpickles and never runs code from the file.
Every problem with a file raises :class:`StatsFileError` (a ``ValueError``) that names the file.
"""

import json
import os

import torch

from . import _reference
from ._version import __version__
from .hooks import Collector, InputHessian
from .stats import ChannelStats, _check_bins

__all__ = ["save", "load", "read_metadata", "StatsFileError", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "calibfast-stats"
FORMAT_VERSION = 1

_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_CAPTURES = ("input", "output", "both")
# key -> (dtype, shape as a function of (C, bins, channel_bins))
_TENSOR_SPECS = {
    "min": (torch.float32, lambda C, B, N: (C,)),
    "max": (torch.float32, lambda C, B, N: (C,)),
    "absmin": (torch.float32, lambda C, B, N: (C,)),
    "sum": (torch.float64, lambda C, B, N: (C,)),
    "sum_abs": (torch.float64, lambda C, B, N: (C,)),
    "sum_sq": (torch.float64, lambda C, B, N: (C,)),
    "count": (torch.int64, lambda C, B, N: (C,)),
    "nan_count": (torch.int64, lambda C, B, N: (C,)),
    "inf_count": (torch.int64, lambda C, B, N: (C,)),
    "hist": (torch.int64, lambda C, B, N: (B,)),
    "hist_exp": (torch.int64, lambda C, B, N: (2,)),
    "channel_hist": (torch.int64, lambda C, B, N: (C if N else 0, N)),
    "channel_hist_exp": (torch.int64, lambda C, B, N: (2, C)),
}


class StatsFileError(ValueError):
    """A statistics file that cannot be read: missing, not safetensors, corrupt, another format,
    a newer format version, or missing / mis-shaped tensors."""


# -- save ---------------------------------------------------------------------------------------
def _entry(name, s):
    e = {"axis": s.axis, "bins": s.bins, "channel_bins": s.channel_bins, "num_channels": s.num_channels}
    if name is not None:
        e = {"name": name, **e}
    return e


def _stats_tensors(prefix, s, out):
    if s._f is None:
        return
    for k, v in s.state_dict().items():
        if k in _TENSOR_SPECS:
            out[prefix + k] = v.detach().cpu().contiguous()


def save(path, stats_or_collector, *, metadata=None):
    """Write a :class:`~calibfast.ChannelStats` or a :class:`~calibfast.Collector` to ``path``
    (safetensors; see the module docstring for the layout). ``metadata``: a JSON-serialisable dict
    stored with it (model name, data ids, options...); :func:`read_metadata` returns it as
    ``["user"]``. The file is written to a temporary name and renamed, so a crash never leaves a
    half-written file under ``path``. Moves the tensors to the CPU (one copy)."""
    from safetensors.torch import save_file

    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(f"calibfast.io.save: metadata must be a dict, got {type(metadata).__name__}")
    try:
        user = json.dumps(metadata, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"calibfast.io.save: metadata must be JSON-serialisable: {e}") from None
    obj = stats_or_collector
    tensors = {}
    if isinstance(obj, ChannelStats):
        kind, contents = "channel_stats", _entry(None, obj)
        _stats_tensors("", obj, tensors)
    elif isinstance(obj, Collector):
        kind = "collector"
        contents = {"capture": obj.capture, "inputs": [], "outputs": [], "hessians": []}
        for side in ("inputs", "outputs"):
            for name, s in getattr(obj, side).items():
                contents[side].append(_entry(name, s))
                _stats_tensors(f"{side}/{name}/", s, tensors)
        for name, h in obj.hessians.items():
            contents["hessians"].append({"name": name, "num_channels": None if h.xtx is None else h.xtx.shape[0]})
            if h.xtx is not None:
                tensors[f"hessians/{name}/xtx"] = h.xtx.detach().cpu().contiguous().clone()
                tensors[f"hessians/{name}/count"] = h.count.detach().cpu().contiguous().clone()
    else:
        raise TypeError(f"calibfast.io.save expects a ChannelStats or a Collector, got {type(obj).__name__}")
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "calibfast_version": __version__,
        "torch_version": torch.__version__,
        "kind": kind,
        "contents": json.dumps(contents, sort_keys=True),
        "user": user,
    }
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -- load ---------------------------------------------------------------------------------------
def _read_header(path):
    """The safetensors JSON header, parsed and checked (format name and version)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(0)
            head = fh.read(8)
            if len(head) < 8:
                raise StatsFileError(f"calibfast: {path} is not a safetensors file ({size} bytes, too short)")
            n = int.from_bytes(head, "little")
            if n < 2 or n > size - 8 or n > _MAX_HEADER_BYTES:
                raise StatsFileError(f"calibfast: {path} is not a safetensors file or is truncated (its header "
                                     f"claims {n} bytes, the file holds {size - 8} after the length)")
            raw = fh.read(n)
    except FileNotFoundError:
        raise StatsFileError(f"calibfast: no statistics file at {path}") from None
    except IsADirectoryError:
        raise StatsFileError(f"calibfast: {path} is a directory, not a statistics file") from None
    except OSError as e:
        raise StatsFileError(f"calibfast: cannot read {path}: {e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise StatsFileError(f"calibfast: {path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise StatsFileError(f"calibfast: {path} is not a safetensors file (its header is not a JSON object)")
    meta = header.get("__metadata__")
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT_NAME:
        what = "no format name" if fmt is None else f"format {fmt!r}"
        raise StatsFileError(f"calibfast: {path} is not a calibfast statistics file ({what} in its safetensors "
                             f"metadata; expected format {FORMAT_NAME!r})")
    version = meta.get("format_version")
    try:
        v = int(version)
    except (TypeError, ValueError):
        raise StatsFileError(f"calibfast: {path} has an invalid format version {version!r}") from None
    if v > FORMAT_VERSION:
        raise StatsFileError(f"calibfast: {path} uses {FORMAT_NAME} version {v}, written by calibfast "
                             f"{meta.get('calibfast_version', '?')}; this calibfast ({__version__}) reads up to "
                             f"version {FORMAT_VERSION}: upgrade calibfast to read it")
    if v < 1:
        raise StatsFileError(f"calibfast: {path} has an invalid format version {version!r}")
    return header, meta


def _json_field(path, meta, key, expect):
    raw = meta.get(key)
    if not isinstance(raw, str):
        raise StatsFileError(f"calibfast: {path} lacks the {key!r} metadata")
    try:
        val = json.loads(raw)
    except ValueError:
        raise StatsFileError(f"calibfast: {path} has invalid JSON in its {key!r} metadata") from None
    if not isinstance(val, expect):
        raise StatsFileError(f"calibfast: {path}: {key!r} metadata must be a JSON {expect.__name__}")
    return val


def read_metadata(path):
    """The description of a statistics file without loading its tensors: a dict with ``format``,
    ``format_version`` (int), ``calibfast_version``, ``torch_version``, ``kind``, ``contents``
    (dict) and ``user`` (the ``metadata`` given to :func:`save`)."""
    path = os.fspath(path)
    _, meta = _read_header(path)
    return {
        "format": meta["format"],
        "format_version": int(meta["format_version"]),
        "calibfast_version": meta.get("calibfast_version"),
        "torch_version": meta.get("torch_version"),
        "kind": meta.get("kind"),
        "contents": _json_field(path, meta, "contents", dict),
        "user": _json_field(path, meta, "user", dict),
    }


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(path, where, e, named):
    if not isinstance(e, dict):
        raise StatsFileError(f"calibfast: {path}: {where} must be a JSON object")
    if named and not isinstance(e.get("name"), str):
        raise StatsFileError(f"calibfast: {path}: {where} has no module name")
    for k in ("axis", "bins", "channel_bins"):
        if not _is_int(e.get(k)):
            raise StatsFileError(f"calibfast: {path}: {where} needs an integer {k!r}, got {e.get(k)!r}")
    for k in ("bins", "channel_bins"):
        try:
            _check_bins(e[k], k)
        except (TypeError, ValueError) as err:
            raise StatsFileError(f"calibfast: {path}: {where}: {err}") from None
    C = e.get("num_channels")
    if C is not None and not (_is_int(C) and C >= 0):
        raise StatsFileError(f"calibfast: {path}: {where} has an invalid num_channels {C!r}")


def _tensor(path, tensors, key, dtype, shape):
    t = tensors.get(key)
    if t is None:
        raise StatsFileError(f"calibfast: {path} lacks the tensor {key!r}")
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise StatsFileError(f"calibfast: {path}: tensor {key!r} must be {dtype} of shape {list(shape)}, "
                             f"got {t.dtype} {list(t.shape)}")
    return t


def _build_stats(path, e, prefix, tensors, where):
    s = ChannelStats(axis=e["axis"], bins=e["bins"], channel_bins=e["channel_bins"])
    C = e["num_channels"]
    if C is None:
        return s
    d = {k: _tensor(path, tensors, prefix + k, dt, shape(C, e["bins"], e["channel_bins"]))
         for k, (dt, shape) in _TENSOR_SPECS.items()}
    d["axis"] = torch.tensor(e["axis"])
    d["bins"] = torch.tensor(e["bins"])
    d["channel_bins"] = torch.tensor(e["channel_bins"])
    exps = torch.cat([d["hist_exp"].reshape(-1), d["channel_hist_exp"].reshape(-1)])
    bad = (exps != _reference.EMPTY_EXP) & ((exps < _reference.MIN_EXP) | (exps > _reference.MAX_EXP))
    if bool(bad.any()):
        raise StatsFileError(f"calibfast: {path}: {where} has histogram exponents out of range")
    return s.load_state_dict(d)


def load(path, *, device="cpu"):
    """Read a file written by :func:`save`: returns a :class:`~calibfast.ChannelStats` or a
    :class:`~calibfast.Collector` whose state tensors equal those saved, on ``device``. Raises
    :class:`StatsFileError` for a missing, foreign, corrupt, newer or incomplete file."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    info = read_metadata(path)
    try:
        tensors = load_file(path, device=str(torch.device(device)))
    except Exception as e:  # SafetensorError, OSError, RuntimeError from a corrupt file
        raise StatsFileError(f"calibfast: {path} is a corrupt safetensors file: {e}") from None
    kind, contents = info["kind"], info["contents"]
    if kind == "channel_stats":
        _check_entry(path, "the statistics", contents, named=False)
        return _build_stats(path, contents, "", tensors, "the statistics")
    if kind != "collector":
        raise StatsFileError(f"calibfast: {path} holds an unknown kind of statistics {kind!r}")
    capture = contents.get("capture")
    if capture not in _CAPTURES:
        raise StatsFileError(f"calibfast: {path}: invalid capture {capture!r}")
    col = Collector(capture)
    for side in ("inputs", "outputs"):
        entries = contents.get(side, [])
        if not isinstance(entries, list):
            raise StatsFileError(f"calibfast: {path}: {side!r} must be a JSON list")
        out = getattr(col, side)
        for e in entries:
            _check_entry(path, f"an entry of {side!r}", e, named=True)
            where = f"{side}[{e['name']!r}]"
            if e["name"] in out:
                raise StatsFileError(f"calibfast: {path}: {where} appears twice")
            out[e["name"]] = _build_stats(path, e, f"{side}/{e['name']}/", tensors, where)
    entries = contents.get("hessians", [])
    if not isinstance(entries, list):
        raise StatsFileError(f"calibfast: {path}: 'hessians' must be a JSON list")
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise StatsFileError(f"calibfast: {path}: an entry of 'hessians' has no module name")
        name, C = e["name"], e.get("num_channels")
        if name in col.hessians:
            raise StatsFileError(f"calibfast: {path}: hessians[{name!r}] appears twice")
        h = InputHessian()
        if C is not None:
            if not (_is_int(C) and C >= 0):
                raise StatsFileError(f"calibfast: {path}: hessians[{name!r}] has an invalid num_channels {C!r}")
            h.xtx = _tensor(path, tensors, f"hessians/{name}/xtx", torch.float32, (C, C)).clone()
            h.count = _tensor(path, tensors, f"hessians/{name}/count", torch.int64, ()).clone()
        col.hessians[name] = h
    return col
