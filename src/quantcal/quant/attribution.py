"""Which layers decide a quantized model's calibration: per-layer (or per-block) attribution.

For a quantized model and labelled validation images, each group of quantized layers ``G`` (one
layer, or one block) is measured two ways against the model's fp32 deploy form:

- **alone**: only ``G`` quantized, everything else in fp32. ``Δ = metric(G quantized) −
  metric(fp32)`` for NLL, ECE (equal-width bins) and accuracy: the damage ``G`` does by itself;
- **all but**: everything quantized except ``G``. ``recovery = metric(all quantized) −
  metric(all but G)``: how much keeping ``G`` in fp32 would give back, interactions included.

This is the one-at-a-time sensitivity analysis of mixed-precision work (e.g. Dong et al., HAWQ,
ICCV 2019, and the per-layer "quantization analysis" of Nagel et al., arXiv 2106.08295 §4.7),
measured on the calibration-relevant quantities (NLL and ECE, Guo et al. 2017) rather than on
accuracy alone (Kuang & Wong, arXiv 2309.13866, ask which layers drive the calibration loss).
Layers are ranked by ``alone_nll`` (NLL is smooth in the logits, where a single layer rarely
moves accuracy or a binned ECE measurably).

**Cost.** Naively, ``2 × groups`` forward passes over the images. Here every pass reuses the
unchanged part of the network: the graph's values for a batch are computed once with every layer
in fp32 (for *alone*) or quantized (for *all but*), and each group then re-executes only the
nodes downstream of it (a layer near the output costs almost nothing);
``bench/bench_attribution.py`` measures the saving against full passes. Memory: one batch's
activations of every node.

Quantized layers are toggled with their ``fake_quant_enabled`` switch (``QuantizedLayer``), so the
quantized model is never rebuilt and each layer, when quantized, is exactly the module that
``quantize`` made (its range observed on fp32 inputs, hence independent of the other layers).
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

__all__ = [
    "AttributionResult",
    "LayerAttribution",
    "attribute_layers",
    "block_of",
    "layer_kind",
]

MODES = ("alone", "all_but")
GRANULARITIES = ("layer", "block")

_INPLACE_FUNCTIONS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.iand,
    operator.ior,
}


def layer_kind(layer: nn.Module) -> str:
    """``depthwise conv``, ``pointwise conv`` (1×1, not grouped), ``grouped conv``, ``conv KxK``
    or ``linear``: the layer types the attribution is summarised by."""
    if isinstance(layer, nn.Linear) or hasattr(layer, "in_features"):
        return "linear"
    groups = getattr(layer, "groups", 1)
    kernel = tuple(getattr(layer, "kernel_size", (1,)))
    if groups > 1 and groups == getattr(layer, "in_channels", -1):
        return "depthwise conv"
    if groups > 1:
        return "grouped conv"
    if all(k == 1 for k in kernel):
        return "pointwise conv"
    return "conv " + "x".join(str(k) for k in kernel)


def block_of(name: str) -> str:
    """The block a layer belongs to: its name through the first run of numeric components
    after the first (``features.2.0.branch1.1.0`` -> ``features.2.0``, ``features.3.conv.0`` ->
    ``features.3``, ``layer1.0.conv1`` -> ``layer1.0``), else its first component
    (``stem.conv`` -> ``stem``)."""
    parts = name.split(".")
    end = 0
    for i, part in enumerate(parts[1:], start=1):
        if part.isdigit():
            end = i + 1
        elif end:
            break
    return ".".join(parts[:end]) if end else parts[0]


@dataclass(frozen=True)
class LayerAttribution:
    """One group's numbers (``Δ`` = metric with the change − metric without; NLL in nats, ECE
    and accuracy as fractions). ``layers`` are the quantized layers of the group.

    ``alone_X`` = X(only this group quantized) − X(fp32): what quantizing it alone costs.
    ``recovery_X`` = X(everything quantized) − X(everything but this group quantized): for NLL
    and ECE (lower is better) a positive value is what keeping the group in fp32 gives back;
    accuracy is higher-better, so the accuracy it gives back is ``-recovery_accuracy`` (one
    formula for every metric, so cached records keep their meaning; the report and the
    attribution finding print the gain with its sign made positive)."""

    name: str
    kind: str
    layers: tuple[str, ...]
    alone_nll: float = math.nan
    alone_ece: float = math.nan
    alone_accuracy: float = math.nan
    recovery_nll: float = math.nan
    recovery_ece: float = math.nan
    recovery_accuracy: float = math.nan


@dataclass
class AttributionResult:
    """Attribution of one quantized model: ``fp32`` and ``quantized`` hold the whole model's
    ``nll``, ``ece`` and ``accuracy`` on the images; ``groups`` are in graph order."""

    precision: str
    granularity: str
    n_samples: int
    n_bins: int
    fp32: dict[str, float]
    quantized: dict[str, float]
    groups: list[LayerAttribution]
    seconds: float = 0.0
    #: nodes re-executed / nodes a full pass per group would have executed
    work_fraction: float = 1.0
    modes: tuple[str, ...] = MODES
    notes: list[str] = field(default_factory=list)
    #: Which images these are, set by the caller: a study records ``{"split": "val" |
    #: "test_half", "n_images": N, "why": ...}`` (``quantcal.training.images``).
    images: dict[str, Any] | None = None

    def ranked(self, by: str = "alone_nll") -> list[LayerAttribution]:
        """Groups from the most to the least harmful by ``by`` (NaN last)."""
        return sorted(self.groups, key=lambda g: -_finite(getattr(g, by)))

    def by_kind(self, by: str = "alone_nll") -> dict[str, dict[str, float]]:
        """Per layer kind: ``count``, ``total`` (Σ of ``by``, negative parts as 0), ``share`` of
        the model's total, and ``mean`` per group. Single-layer groups only (a block mixes
        kinds)."""
        out: dict[str, dict[str, float]] = {}
        for g in self.groups:
            d = out.setdefault(g.kind, {"count": 0, "total": 0.0})
            d["count"] += 1
            d["total"] += max(0.0, _finite(getattr(g, by), 0.0))
        whole = sum(d["total"] for d in out.values())
        for d in out.values():
            d["share"] = d["total"] / whole if whole > 0 else math.nan
            d["mean"] = d["total"] / d["count"]
        return out

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["groups"] = [asdict(g) for g in self.groups]
        d["modes"] = list(self.modes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttributionResult:
        d = dict(d)
        d["groups"] = [
            LayerAttribution(**{**g, "layers": tuple(g["layers"])}) for g in d.get("groups", [])
        ]
        d["modes"] = tuple(d.get("modes", MODES))
        return cls(**d)


def _finite(v: float, default: float = -math.inf) -> float:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else default


# ----------------------------------------------------------------------------- graph replay


def _is_inplace(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (
            node.target in _INPLACE_FUNCTIONS
            or bool(node.kwargs.get("inplace", False))
            or (name.endswith("_") and not name.endswith("__"))
        )
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    return False


class _Replay:
    """Runs an fx graph node by node, keeping every node's value, and re-runs the nodes
    downstream of chosen modules against those values. In-place operations never mutate a kept
    value (their first argument is copied first)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.inplace = {n for n in self.nodes if _is_inplace(gm, n)}
        self.modules = dict(gm.named_modules())
        self._downstream: dict[frozenset[str], list[torch.fx.Node]] = {}

    def downstream(self, targets: frozenset[str]) -> list[torch.fx.Node]:
        """The nodes that call one of ``targets`` or read (transitively) from one, in graph
        order."""
        if targets not in self._downstream:
            dirty: set[torch.fx.Node] = set()
            order = []
            for n in self.nodes:
                hit = n.op == "call_module" and str(n.target) in targets
                if hit or any(a in dirty for a in n.all_input_nodes):
                    dirty.add(n)
                    order.append(n)
            self._downstream[targets] = order
        return self._downstream[targets]

    def _exec(
        self,
        node: torch.fx.Node,
        value: Callable[[torch.fx.Node], Any],
        kept: Callable[[Any], bool] = lambda a: True,
    ) -> Any:
        args = torch.fx.node.map_arg(node.args, value)
        kwargs = torch.fx.node.map_arg(node.kwargs, value)
        if (
            node in self.inplace
            and args
            and isinstance(args[0], torch.Tensor)
            and kept(node.args[0])
        ):
            args = (args[0].clone(), *args[1:])
        if node.op == "call_module":
            return self.modules[str(node.target)](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        raise RuntimeError(f"cannot replay node {node.op} {node.target}")  # pragma: no cover

    def run(self, x: torch.Tensor) -> tuple[dict[torch.fx.Node, Any], torch.Tensor]:
        """Every node's value and the output for input ``x``."""
        env: dict[torch.fx.Node, Any] = {}
        out = None
        for n in self.nodes:
            if n.op == "placeholder":
                env[n] = x
            elif n.op == "get_attr":
                obj: Any = self.gm
                for part in str(n.target).split("."):
                    obj = getattr(obj, part)
                env[n] = obj
            elif n.op == "output":
                out = torch.fx.node.map_arg(n.args[0], lambda a: env[a])
            else:
                env[n] = self._exec(n, lambda a: env[a])
        if not isinstance(out, torch.Tensor):
            raise ValueError(
                f"attribution needs a model whose output is one logits tensor, got {type(out)}"
            )
        return env, out

    def rerun(self, env: dict[torch.fx.Node, Any], targets: frozenset[str]) -> torch.Tensor:
        """The output when only the nodes downstream of ``targets`` are recomputed."""
        fresh: dict[torch.fx.Node, Any] = {}

        def value(a: torch.fx.Node) -> Any:
            return fresh[a] if a in fresh else env[a]

        out = None
        for n in self.downstream(targets):
            if n.op == "output":
                out = torch.fx.node.map_arg(n.args[0], value)
            else:  # a value made in this rerun may be mutated, as in the forward
                fresh[n] = self._exec(n, value, lambda a: a not in fresh)
        if out is None:  # the group does not reach the output: the logits are unchanged
            out = torch.fx.node.map_arg(
                next(n for n in self.nodes if n.op == "output").args[0], value
            )
        return out


# ----------------------------------------------------------------------------- the analysis


def _metrics(z: torch.Tensor, y: torch.Tensor, n_bins: int) -> dict[str, float]:
    from quantcal.calibration import metrics

    return {
        "nll": metrics.nll(z, y),
        "ece": metrics.ece(z, y, n_bins=n_bins),
        "accuracy": metrics.accuracy(z, y),
    }


def _batches(data: Any, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a pair of tensors or an iterable of ``(x, y)`` batches."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
    else:
        xs, ys = [], []
        for batch in data:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise ValueError(
                    "attribute_layers needs labelled data: (x, y) tensors or an iterable of "
                    f"(x, y) batches; got a batch of type {type(batch).__name__}"
                )
            xs.append(batch[0])
            ys.append(batch[1])
        if not xs:
            raise ValueError("attribute_layers got no validation images")
        x, y = torch.cat(xs), torch.cat(ys)
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"attribute_layers needs as many labels as images (and at least one), got "
            f"{x.shape[0]} images and {y.shape[0]} labels"
        )
    return x, y


def attribute_layers(
    qmodel: nn.Module,
    data: Any,
    *,
    granularity: str = "layer",
    modes: Iterable[str] = MODES,
    n_bins: int = 15,
    batch_size: int = 32,
    max_samples: int | None = None,
    naive: bool = False,
) -> AttributionResult:
    """Per-layer (or per-block) attribution of ``qmodel``'s calibration loss (module docstring).

    Args:
        qmodel: a model made by :func:`quantcal.quant.quantize` (an ``fx.GraphModule`` whose
            quantized layers can be switched to fp32); it is left as it was.
        data: validation images and labels, ``(x, y)`` tensors or an iterable of ``(x, y)``
            batches (never the test split: this chooses what to look at).
        granularity: ``layer`` (each quantized layer) or ``block`` (:func:`block_of`).
        modes: ``alone`` and/or ``all_but``.
        n_bins: equal-width bins of the ECE.
        batch_size: images per replayed batch (memory: one batch's activations of every node;
            small batches stay in the CPU's caches: 32 was fastest in bench_attribution.py).
        max_samples: use the first this many images (the cost is linear in it).
        naive: run a full forward pass per group instead of replaying (the reference the fast
            path is tested against, and the baseline of the bench).
    """
    from quantcal.quant.apply import quantized_layers

    modes = tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown attribution mode(s) {bad}; choose from {', '.join(MODES)}")
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}"
        )
    layers = quantized_layers(qmodel)
    if not layers:
        raise ValueError(
            "attribute_layers needs a quantized model (quant.quantize(model, 'W4A4', calib)); "
            "this one has no quantized layer"
        )
    if not isinstance(qmodel, torch.fx.GraphModule):
        naive = True  # nothing to replay: full passes are still correct
    x, y = _batches(data, batch_size)
    if max_samples is not None:
        x, y = x[:max_samples], y[:max_samples]
    groups: dict[str, list[str]] = {}
    for name, _ in layers:
        groups.setdefault(name if granularity == "layer" else block_of(name), []).append(name)
    table = dict(layers)
    states = {n: (m.fake_quant_enabled, m.owns_input) for n, m in layers}
    device = next(iter(qmodel.buffers())).device
    t0 = time.perf_counter()
    logits: dict[tuple[str, str], list[torch.Tensor]] = {}
    base: dict[str, list[torch.Tensor]] = {"fp32": [], "quantized": []}
    replay = None if naive else _Replay(qmodel)
    notes: list[str] = []
    executed = 0
    full = 0

    def set_all(enabled: bool) -> None:
        for m in table.values():
            m.fake_quant_enabled = enabled

    try:
        for m in table.values():
            m.owns_input = False  # kept values must not be quantized in place
        if replay is not None and not _replay_is_faithful(replay, qmodel, x[:batch_size], device):
            replay = None  # the graph relies on aliasing the replay does not keep
            notes.append(
                "the replay of this graph differs from its forward (an in-place operation whose "
                "input is read again later); measured with full passes instead"
            )
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                xb = x[i : i + batch_size].to(device)
                for mode in ("alone", "all_but"):
                    # the base pass: all fp32 (alone) or all quantized (all but)
                    set_all(mode == "all_but")
                    env, out = replay.run(xb) if replay is not None else (None, qmodel(xb))
                    base["fp32" if mode == "alone" else "quantized"].append(out.float().cpu())
                    if mode not in modes:
                        continue
                    for gname, members in groups.items():
                        for n in members:
                            table[n].fake_quant_enabled = mode == "alone"
                        if replay is not None:
                            z = replay.rerun(env, frozenset(members))
                            executed += len(replay.downstream(frozenset(members)))
                            full += len(replay.nodes)
                        else:
                            z = qmodel(xb)
                        logits.setdefault((mode, gname), []).append(z.float().cpu())
                        for n in members:
                            table[n].fake_quant_enabled = mode != "alone"
                    del env
    finally:
        for n, m in table.items():
            m.fake_quant_enabled, m.owns_input = states[n]
    yy = y.cpu()
    fp32 = _metrics(torch.cat(base["fp32"]), yy, n_bins)
    quantized = _metrics(torch.cat(base["quantized"]), yy, n_bins)
    out_groups = []
    for gname, members in groups.items():
        kinds = {layer_kind(table[n]) for n in members}
        values: dict[str, float] = {}
        if "alone" in modes:
            m = _metrics(torch.cat(logits[("alone", gname)]), yy, n_bins)
            values.update({f"alone_{k}": m[k] - fp32[k] for k in m})
        if "all_but" in modes:
            m = _metrics(torch.cat(logits[("all_but", gname)]), yy, n_bins)
            values.update({f"recovery_{k}": quantized[k] - m[k] for k in m})
        kind = kinds.pop() if len(kinds) == 1 else "block"
        out_groups.append(LayerAttribution(gname, kind, tuple(members), **values))
    precision = str(getattr(qmodel, "precision", "?"))
    return AttributionResult(
        precision=precision,
        granularity=granularity,
        n_samples=int(x.shape[0]),
        n_bins=n_bins,
        fp32=fp32,
        quantized=quantized,
        groups=out_groups,
        seconds=time.perf_counter() - t0,
        work_fraction=executed / full if full else 1.0,
        modes=modes,
        notes=notes,
    )


def _replay_is_faithful(
    replay: _Replay, qmodel: nn.Module, xb: torch.Tensor, device: torch.device
) -> bool:
    """Whether the node-by-node replay computes exactly the model's forward on ``xb`` (it may
    not where an in-place operation mutates a value that a later node reads: the replay keeps
    every value as it was made)."""
    with torch.no_grad():
        _, out = replay.run(xb.to(device))
        return bool(torch.equal(out, qmodel(xb.to(device))))
