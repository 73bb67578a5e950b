"""Collect per-channel statistics inside a model's forward pass with forward hooks."""

import contextlib
import inspect
import itertools
import time
import weakref

import torch
from torch import nn

from .stats import ChannelStats

DEFAULT_MODULE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CAPTURE = ("input", "output", "both")


def channel_axis(module):
    """The channel axis of a module's input and output activations: the last dim for Linear (and
    anything else), dim 1 of a batched ConvNd tensor (written -(N+1), so unbatched inputs work)."""
    for n, cls in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d),
                   (1, nn.ConvTranspose1d), (2, nn.ConvTranspose2d), (3, nn.ConvTranspose3d)):
        if isinstance(module, cls):
            return -(n + 1)
    return -1


def _first_tensor(obj):
    """The first floating-point tensor in a (nested) tuple/list/dict, or None. For a module's
    input: the positional arguments first, then the keyword arguments."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    elif isinstance(obj, dict):
        for o in obj.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _select(model, modules):
    named = list(model.named_modules())
    if modules is None:
        return [(n, m) for n, m in named if isinstance(m, DEFAULT_MODULE_TYPES)]
    if isinstance(modules, type):
        modules = (modules,)
    if isinstance(modules, tuple) and all(isinstance(t, type) for t in modules):
        return [(n, m) for n, m in named if isinstance(m, modules)]
    if callable(modules):
        try:
            two = len(inspect.signature(modules).parameters) >= 2
        except (TypeError, ValueError):
            two = False
        if two:
            return [(n, m) for n, m in named if modules(n, m)]
        return [(n, m) for n, m in named if modules(m)]
    if isinstance(modules, str):
        modules = [modules]
    names = list(dict.fromkeys(modules))  # a name given twice is hooked once
    by_name = dict(named)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        known = [n for n, _ in named if n][:8]
        raise ValueError(f"calibfast: no module named {unknown} in the model; its modules include {known}"
                         f"{' ...' if len(named) > 9 else ''}")
    return [(n, by_name[n]) for n in names]


class Collector:
    """What :func:`collect` yields: ``inputs`` and ``outputs`` map module name -> ChannelStats for
    the sides captured; ``collector[name]`` is the captured side (the input when both are)."""

    def __init__(self, capture):
        self.capture = capture
        self.inputs = {}
        self.outputs = {}
        self.hessians = {}
        self._shared = None

    @property
    def shared_updates(self):
        """Updates that were copies of a sibling's (``collect(share_inputs=True)``): reads saved."""
        return self._shared.shared if self._shared is not None else 0

    @property
    def _primary(self):
        return self.outputs if self.capture == "output" else self.inputs

    def __getitem__(self, name):
        try:
            return self._primary[name]
        except KeyError:
            raise KeyError(f"calibfast: no statistics for module {name!r}; collected: "
                           f"{list(self._primary)[:8]}") from None

    def __contains__(self, name):
        return name in self._primary

    def __iter__(self):
        return iter(self._primary)

    def __len__(self):
        return len(self._primary)

    def keys(self):
        return self._primary.keys()

    def items(self):
        return self._primary.items()

    def values(self):
        return self._primary.values()

    def reset(self):
        for s in list(self.inputs.values()) + list(self.outputs.values()):
            s.reset()

    def state_dict(self):
        return {
            "inputs": {k: v.state_dict() for k, v in self.inputs.items() if v.initialized},
            "outputs": {k: v.state_dict() for k, v in self.outputs.items() if v.initialized},
        }

    def __repr__(self):
        return f"Collector(capture={self.capture!r}, modules={len(self)})"


def _version_of(t):
    # inference tensors keep no version counter (asking raises, and a torch error costs ~0.1 ms)
    return None if t.is_inference() else t._version


class _SharedInputs:
    """Folds each distinct tensor once when several hooked modules see the very same one (the
    q/k/v projections of one hidden state, gate/up of a gated MLP): the later modules' statistics
    are copied instead of read again from the tensor.

    Every ChannelStats the hooks update has a lineage: an id for the exact sequence of tensors it
    folded in since its state was last set. When a hook is about to fold tensor t into s, and
    another ChannelStats r of the same configuration went from s's lineage to a new one by folding
    the same t (the same object, with the same version counter), and neither was changed since
    (each keeps an epoch that every update, merge, reset or load bumps), then s becomes a copy of
    r: the state the update would have produced. Anything else (a tensor not seen just before, a
    state touched outside the hooks) is an ordinary update. Inference tensors have no version
    counter: for them the same object is taken to hold the same values, which holds unless the
    model writes into a layer's input in place between two sibling layers."""

    _RECENT = 4  # tensors remembered (inputs and outputs of consecutive hooks)

    def __init__(self):
        self._ids = itertools.count(1)
        self._recent = []  # [(weakref to the tensor, version, token)], newest last
        self._next = {}  # token -> {lineage: lineage after folding it}
        self._holder = {}  # token -> {lineage: the ChannelStats that reached it}
        self._state = {}  # id(stats) -> (lineage, epoch when recorded)
        self.shared = 0  # updates saved

    def _token(self, t):
        v = _version_of(t)
        for ref, ver, tok in self._recent:
            if ref() is t and ver == v:
                return tok
        tok = next(self._ids)
        self._recent.append((weakref.ref(t), v, tok))
        self._next[tok], self._holder[tok] = {}, {}
        if len(self._recent) > self._RECENT:
            _, _, old = self._recent.pop(0)
            del self._next[old], self._holder[old]
        return tok

    def fold(self, s, t):
        tok = self._token(t)
        rec = self._state.get(id(s))
        if s._f is None:
            lin = ("empty", s.axis, s.bins, s.channel_bins, s.backend)  # all fresh ones are alike
        elif rec is not None and rec[1] == s._epoch:
            lin = rec[0]
        else:
            lin = next(self._ids)  # a history the hooks did not see: its own
        new = self._next[tok].get(lin)
        src = self._holder[tok].get(new) if new is not None else None
        if (src is not None and src is not s and self._state.get(id(src)) == (new, src._epoch)
                and src._same_config(s) and src.initialized):
            s._copy_state_from(src)
            self.shared += 1
        else:
            s.update(t)
            if new is None:
                new = self._next[tok][lin] = next(self._ids)
            self._holder[tok][new] = s
        self._state[id(s)] = (new, s._epoch)


class _HookTimer:
    """Times the hooks of the given modules: around their forward pre-hooks (``pre``) and their
    forward hooks (``post``), a hook put before the module's hooks and one after them (hooks run in
    registration order) accumulate the host time in between."""

    def __init__(self, modules, pre=True, post=True):
        self.modules, self.pre, self.post = list(modules), pre, post
        self.seconds = 0.0
        self._t0 = 0.0
        self._handles = []

    def _start(self, *a):
        self._t0 = time.perf_counter()

    def _stop(self, *a):
        self.seconds += time.perf_counter() - self._t0

    def __enter__(self):
        for m in self.modules:
            regs = ([m.register_forward_pre_hook] if self.pre else []) + ([m.register_forward_hook] if self.post else [])
            for reg in regs:
                self._handles.append(reg(self._start, prepend=True))
                self._handles.append(reg(self._stop))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False


class InputHessian:
    """Running XᵀX of a Linear layer's inputs (rows = every position of every batch), the input
    Hessian that GPTQ-style weight quantizers use (H = 2 XᵀX / count). Accumulated in float32 on
    the activations' device with one matrix product per call (addmm), as GPTQ does; ``count`` is
    the number of rows (int64)."""

    def __init__(self):
        self.xtx = None
        self.count = None

    def update(self, x):
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        with torch.inference_mode(False):
            if self.xtx is None:
                C = x2.shape[1]
                self.xtx = torch.zeros(C, C, dtype=torch.float32, device=x2.device)
                self.count = torch.zeros((), dtype=torch.int64, device=x2.device)
            elif x2.shape[1] != self.xtx.shape[0]:
                raise ValueError(f"calibfast: input Hessian holds {self.xtx.shape[0]} channels, got "
                                 f"{x2.shape[1]}")
            self.xtx.addmm_(x2.t(), x2)
            self.count += x2.shape[0]
        return self

    def hessian(self):
        """2 XᵀX / count (float32), GPTQ's H."""
        if self.xtx is None:
            raise RuntimeError("calibfast: this InputHessian has seen no input")
        return self.xtx * (2.0 / self.count.clamp_min(1).to(torch.float32))


@contextlib.contextmanager
def collect(model, *, capture="input", modules=None, axis=None, backend="dispatch", bins=2048,
            channel_bins=0, hessian=False, share_inputs=True):
    """Attach hooks that fold activations into per-channel statistics: a forward pre-hook per
    module for its input (read before the module runs, while the tensor is still in cache), a
    forward hook for its output.

    Args:
        model: an ``nn.Module``.
        capture: ``"input"``, ``"output"`` or ``"both"``.
        modules: which modules to hook: ``None`` (every nn.Linear and nn.Conv1d/2d/3d), a list
            of module names, a type or tuple of types, or a predicate ``f(module)`` or
            ``f(name, module)``.
        axis: the channel axis to use for every hooked module (default: :func:`channel_axis`).
        backend: passed to every :class:`ChannelStats` (``"reference"`` forces pure torch).
        bins, channel_bins: histogram sizes of every :class:`ChannelStats`.
        hessian: also accumulate each hooked nn.Linear's input XᵀX (:class:`InputHessian`, in
            ``collector.hessians``), for GPTQ-style quantizers.
        share_inputs: when several hooked modules get the very same tensor in a row (q/k/v
            projections, gate/up), read it once and copy the resulting statistics to the others
            (the same values an update gives; ``collector.shared_updates`` counts the reads
            saved). ``False`` updates every module from the tensor.

    Yields a :class:`Collector`. Hooks are removed on exit, also when the body raises; the
    statistics stay in the collector.
    """
    if capture not in _CAPTURE:
        raise ValueError(f"calibfast: capture must be one of {_CAPTURE}, got {capture!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibfast: collect expects an nn.Module, got {type(model).__name__}")
    selected = _select(model, modules)
    col = Collector(capture)
    shared = _SharedInputs() if share_inputs else None
    col._shared = shared
    want_in = capture in ("input", "both")
    want_out = capture in ("output", "both")
    handles = []

    def make(ax):
        return ChannelStats(axis=ax, backend=backend, bins=bins, channel_bins=channel_bins)

    try:
        for name, mod in selected:
            ax = channel_axis(mod) if axis is None else axis
            s_in = col.inputs.setdefault(name, make(ax)) if want_in else None
            s_out = col.outputs.setdefault(name, make(ax)) if want_out else None
            h = col.hessians.setdefault(name, InputHessian()) if hessian and isinstance(mod, nn.Linear) else None
            if s_in is not None or h is not None:
                handles.append(mod.register_forward_pre_hook(_make_input_hook(s_in, h, shared), with_kwargs=True))
            if s_out is not None:
                handles.append(mod.register_forward_hook(_make_output_hook(s_out, shared)))
        yield col
    finally:
        for h in handles:
            h.remove()


def _fold_fn(shared):
    return shared.fold if shared is not None else (lambda s, t: s.update(t))


def _make_input_hook(s_in, hess=None, shared=None):
    # A forward pre-hook: the input is read before the module runs, while it is still in cache
    # from the op that produced it (after a Linear's matrix product it would come from memory:
    # MiniLM's statistics took ~2x as long in forward hooks on this machine).
    fold = _fold_fn(shared)

    def hook(module, args, kwargs):
        t = _first_tensor(args)
        if t is None and kwargs:
            t = _first_tensor(kwargs)
        if t is not None:
            if s_in is not None:
                fold(s_in, t)
            if hess is not None:
                hess.update(t)

    return hook


def _make_output_hook(s_out, shared=None):
    fold = _fold_fn(shared)

    def hook(module, args, output):
        t = _first_tensor(output)
        if t is not None:
            fold(s_out, t)

    return hook
