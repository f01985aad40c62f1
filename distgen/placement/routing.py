"""Routing statistics for expert placement: per-layer expert loads and cross-layer co-routing.

A :class:`RoutingTrace` is what placement policies read: for each MoE layer the number of
token choices per expert (``loads``), and for each pair of consecutive MoE layers the matrix
``cross[l, i, j]`` of (token, choice in layer l, choice in layer l+1) pairs routed to expert i
in layer l and expert j in the next MoE layer (MoETuner's C_l). A :class:`RoutingRecorder`
builds one from the ``experts`` tensors a model's routers produce; :func:`synthetic` makes one
with tunable skew and cross-layer correlation (random routers give neither).
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass

import numpy as np
import torch

from distgen.config import ConfigError

_TRACE_KEYS = ("layers", "num_experts", "top_k", "loads", "cross", "tokens")


def _layer_span(layers: tuple[int, ...]) -> str:
    """(0, 1, ..., 29) -> '0..29'; otherwise the list."""
    layers = tuple(layers)
    if layers and layers == tuple(range(layers[0], layers[-1] + 1)):
        return f"({layers[0]}..{layers[-1]})" if len(layers) > 1 else f"({layers[0]})"
    return "(" + ", ".join(str(x) for x in layers) + ")"


@dataclass
class RoutingTrace:
    layers: tuple[int, ...]  # model layer indices of the MoE layers, ascending
    num_experts: int
    top_k: int
    loads: np.ndarray  # (len(layers), E) float64: token choices per expert
    cross: np.ndarray  # (len(layers) - 1, E, E) float64: choice pairs between consecutive MoE layers
    tokens: int  # tokens observed

    def __post_init__(self):
        self.layers = tuple(int(x) for x in self.layers)
        self.loads = np.asarray(self.loads, dtype=np.float64)
        self.cross = np.asarray(self.cross, dtype=np.float64)

    def save(self, path: str) -> None:
        np.savez_compressed(path, layers=np.asarray(self.layers, dtype=np.int64),
                            num_experts=np.int64(self.num_experts), top_k=np.int64(self.top_k),
                            loads=self.loads, cross=self.cross, tokens=np.int64(self.tokens))

    @classmethod
    def load(cls, path: str) -> "RoutingTrace":
        if not os.path.isfile(path):
            raise ConfigError(f"--routing: no such file {path!r} (expected a .npz written by --record-routing "
                              "or `distgen place --save-trace`)")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in _TRACE_KEYS if k not in data.files]
                if missing:
                    raise ConfigError(f"--routing: {path} is not a routing trace: missing {', '.join(missing)} "
                                      f"(a trace holds {', '.join(_TRACE_KEYS)})")
                fields = {k: data[k] for k in _TRACE_KEYS}
        except ConfigError:
            raise
        except Exception as exc:  # zip / format errors of a corrupt file
            raise ConfigError(f"--routing: cannot read {path}: {exc}") from None
        layers = tuple(int(x) for x in np.atleast_1d(fields["layers"]))
        experts, top_k = int(fields["num_experts"]), int(fields["top_k"])
        loads, cross = fields["loads"], fields["cross"]
        if loads.shape != (len(layers), experts):
            raise ConfigError(f"--routing: {path} has loads of shape {loads.shape}, expected "
                              f"({len(layers)}, {experts}) for {len(layers)} MoE layers of {experts} experts")
        if cross.shape != (max(len(layers) - 1, 0), experts, experts):
            raise ConfigError(f"--routing: {path} has cross of shape {cross.shape}, expected "
                              f"({max(len(layers) - 1, 0)}, {experts}, {experts})")
        if list(layers) != sorted(set(layers)):
            raise ConfigError(f"--routing: {path} lists MoE layers {list(layers)}, which are not ascending")
        return cls(layers=layers, num_experts=experts, top_k=top_k, loads=loads, cross=cross,
                   tokens=int(fields["tokens"]))

    def check_for(self, num_experts: int, moe_layers: tuple[int, ...], source: str) -> None:
        """Raise ConfigError saying exactly how this trace differs from the model. ``source``: where
        the trace came from as the user gave it (``--routing FILE``)."""
        if self.num_experts != num_experts:
            raise ConfigError(f"{source}: the routing trace has {self.num_experts} experts per layer, "
                              f"the model has {num_experts}")
        if tuple(self.layers) != tuple(moe_layers):
            raise ConfigError(f"{source}: the routing trace records {len(self.layers)} MoE layers "
                              f"{_layer_span(self.layers)}, the model's are {len(moe_layers)} layers "
                              f"{_layer_span(tuple(moe_layers))}")


class RoutingRecorder:
    """Accumulates a :class:`RoutingTrace` from router outputs.

    ``observe(layer, experts)`` is called once per MoE layer per forward pass, in ascending layer
    order, with the same tokens in the same row order in every layer of the pass (a
    :class:`distgen.models.moe.MoEBlock` calls its ``observer`` that way). A call for a layer
    at or before the previous call's layer starts a new pass. Co-routing is counted between
    consecutive MoE layers of one pass. Counters stay on the experts' device (no host sync per
    call; :meth:`trace` and :meth:`window_loads` copy them out);
    ``window`` keeps per-pass loads of the last ``window`` passes for :meth:`window_loads`.
    """

    def __init__(self, layers, num_experts: int, top_k: int, window: int | None = None):
        self.layers = tuple(int(x) for x in layers)
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"MoE layers must be ascending and distinct, got {list(self.layers)}")
        if window is not None and window < 1:
            raise ConfigError(f"routing window must be >= 1 forward passes (or None for all), got {window}")
        self.num_experts, self.top_k, self.window = int(num_experts), int(top_k), window
        self._position = {layer: i for i, layer in enumerate(self.layers)}
        self.reset()

    def reset(self) -> None:
        self._loads = None  # torch (L, E) int64
        self._cross = None  # torch (L-1, E*E) int64
        # per-pass (L, E) loads of the last `window` passes (kept only when a window is set)
        self._passes: collections.deque = collections.deque(maxlen=self.window)
        self._prev: tuple[int, torch.Tensor] | None = None  # (position, experts) of the last call
        self.tokens = 0
        self.passes = 0

    def _alloc(self, device) -> None:
        n, e = len(self.layers), self.num_experts
        self._loads = torch.zeros(n, e, dtype=torch.int64, device=device)
        self._cross = torch.zeros(max(n - 1, 0), e * e, dtype=torch.int64, device=device)

    def observe(self, layer: int, experts: torch.Tensor) -> None:
        if layer not in self._position:
            raise ValueError(f"layer {layer} is not one of the recorded MoE layers {list(self.layers)}")
        pos = self._position[layer]
        experts = experts.detach().reshape(experts.shape[0], -1).to(torch.int64)
        if self._loads is None:
            self._alloc(experts.device)
        e = self.num_experts
        # index_add_ rather than bincount: bincount sizes its output from the data, which on a GPU
        # is a host sync per call; this stays asynchronous
        flat = experts.reshape(-1)
        counts = torch.zeros(e, dtype=torch.int64, device=experts.device).index_add_(0, flat, torch.ones_like(flat))
        if self._prev is None or pos <= self._prev[0]:  # a new forward pass
            self.passes += 1
            self.tokens += int(experts.shape[0])
            if self.window is not None:
                self._passes.append(torch.zeros_like(self._loads))
            self._prev = None
        self._loads[pos] += counts
        if self.window is not None:
            self._passes[-1][pos] += counts
        if self._prev is not None and self._prev[0] == pos - 1:
            prev = self._prev[1]
            if prev.shape[0] != experts.shape[0]:
                raise ValueError(f"layer {layer} saw {experts.shape[0]} tokens, the previous MoE layer of the "
                                 f"same pass {prev.shape[0]}: routing rows must be the same tokens")
            # every (choice in l, choice in l+1) pair of a token: top_k * top_k pairs of weight 1
            pairs = (prev[:, :, None] * e + experts[:, None, :]).reshape(-1)
            self._cross[pos - 1].index_add_(0, pairs, torch.ones_like(pairs))
        self._prev = (pos, experts)

    def __call__(self, layer: int, experts: torch.Tensor) -> None:
        self.observe(layer, experts)

    def window_loads(self) -> np.ndarray:
        """(L, E) loads over the last ``window`` forward passes (everything when window is None)."""
        if self._loads is None:
            return np.zeros((len(self.layers), self.num_experts))
        if self.window is None:
            return self._loads.cpu().numpy().astype(np.float64)
        return torch.stack(list(self._passes)).sum(0).cpu().numpy().astype(np.float64)

    def trace(self) -> RoutingTrace:
        n, e = len(self.layers), self.num_experts
        if self._loads is None:
            loads, cross = np.zeros((n, e)), np.zeros((max(n - 1, 0), e, e))
        else:
            loads = self._loads.cpu().numpy().astype(np.float64)
            cross = self._cross.cpu().numpy().astype(np.float64).reshape(max(n - 1, 0), e, e)
        return RoutingTrace(layers=self.layers, num_experts=e, top_k=self.top_k, loads=loads, cross=cross,
                            tokens=self.tokens)


def zipf_popularity(num_experts: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities p[e] proportional to 1 / rank(e)^s over a random permutation of experts."""
    weights = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** s
    p = np.empty(num_experts)
    p[rng.permutation(num_experts)] = weights / weights.sum()
    return p


def _sample_distinct(p: np.ndarray, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """rows x k distinct draws without replacement from p (Gumbel-top-k)."""
    keys = np.log(np.maximum(p, 1e-300))[None, :] + rng.gumbel(size=(rows, p.shape[0]))
    return np.argsort(-keys, axis=1, kind="stable")[:, :k]


def synthetic(num_layers: int, num_experts: int, top_k: int, tokens: int, zipf_s: float = 1.0,
              correlation: float = 0.8, seed: int = 0) -> RoutingTrace:
    """A routing trace with skewed expert popularity and cross-layer co-routing.

    The model (all draws from ``numpy.random.default_rng(seed)``):

    * Popularity: each layer l has its own Zipf(``zipf_s``) distribution over a random
      permutation of the experts, p_l[e] ∝ 1 / rank_l(e)^s (s = 0: uniform).
    * Layer 0: each token draws ``top_k`` distinct experts from p_0 (without replacement).
    * Layer l+1: layer l has a fixed random permutation ``path_l`` of the experts. Each token,
      with probability ``correlation``, follows its path: its choices in layer l+1 are
      ``path_l`` applied to its layer-l choices (distinct, since path_l is a permutation);
      otherwise it draws ``top_k`` distinct experts afresh from p_{l+1}.

    So the expert-to-expert matrix between consecutive layers concentrates a ``correlation``
    share of its mass on the permutation ``path_l`` (strong co-routing that a placement can
    exploit by putting e and path_l[e] on one rank), and the loads of layer l+1 mix
    ``correlation`` × layer l's loads (permuted) with (1 - correlation) × its own Zipf skew.
    Layers are numbered 0..num_layers-1.
    """
    if num_layers < 1 or num_experts < 1 or tokens < 1:
        raise ConfigError(f"synthetic trace needs layers, experts and tokens >= 1, got "
                          f"{num_layers}, {num_experts}, {tokens}")
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"synthetic trace: top_k must be in 1..{num_experts} (the number of experts), got {top_k}")
    if not 0.0 <= correlation <= 1.0:
        raise ConfigError(f"--correlation must be in [0, 1], got {correlation}")
    if zipf_s < 0:
        raise ConfigError(f"--zipf must be >= 0 (0 = uniform), got {zipf_s}")
    rng = np.random.default_rng(seed)
    e = num_experts
    loads = np.zeros((num_layers, e))
    cross = np.zeros((num_layers - 1, e, e))
    choices = _sample_distinct(zipf_popularity(e, zipf_s, rng), tokens, top_k, rng)
    loads[0] = np.bincount(choices.reshape(-1), minlength=e)
    for layer in range(1, num_layers):
        popularity = zipf_popularity(e, zipf_s, rng)
        path = rng.permutation(e)
        follow = rng.random(tokens) < correlation
        fresh = _sample_distinct(popularity, tokens, top_k, rng)
        nxt = np.where(follow[:, None], path[choices], fresh)
        loads[layer] = np.bincount(nxt.reshape(-1), minlength=e)
        pairs = (choices[:, :, None] * e + nxt[:, None, :]).reshape(-1)
        cross[layer - 1] = np.bincount(pairs, minlength=e * e).reshape(e, e)
        choices = nxt
    return RoutingTrace(layers=tuple(range(num_layers)), num_experts=e, top_k=top_k, loads=loads,
                        cross=cross, tokens=tokens)
