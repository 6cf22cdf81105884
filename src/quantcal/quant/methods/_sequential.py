"""Run a deploy graph layer by layer over all range-calibration data, quantizing as it goes.

Methods that set a layer from what the *quantized* network feeds it (sequential range setting,
bias correction, AdaRound) need each layer's input with every layer upstream already quantized,
and often the fp32 network's input beside it. :func:`run_sequential` executes the fx graph node
by node over all batches at once: when it reaches a quantizable layer it hands the method that
layer's inputs (quantized path, and fp32 path if asked), installs the layer the method returns,
and goes on. One pass over the graph instead of one pass per layer; values are freed after their
last use, so memory is the live activations of the calibration set (two copies with fp32 kept).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from quantcal.quant.fallback import sequential_refusal
from quantcal.quant.graph import device_of, set_submodule
from quantcal.quant.layers import QuantizedLayer
from quantcal.quant.target import LayerTarget

#: ``on_layer(name, fp32_module, quantized_path_inputs, fp32_path_inputs_or_None) -> layer``, or
#: ``(layer, fp32_outputs)`` when it has already run the fp32 module on the fp32 inputs (the
#: pass then uses those outputs instead of running it again).
OnLayer = Callable[[str, nn.Module, list[torch.Tensor], "list[torch.Tensor] | None"], nn.Module]


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _call(gm: fx.GraphModule, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    raise RuntimeError(f"unexpected fx node {node.op} {node.target}")


def run_sequential(
    gm: fx.GraphModule,
    target: LayerTarget,
    xs: list[torch.Tensor],
    on_layer: OnLayer,
    *,
    keep_fp32: bool = False,
) -> dict[str, QuantizedLayer]:
    """Execute ``gm`` over every batch of ``xs``, node by node; at the first call of each layer
    in ``target.names`` call ``on_layer`` with its inputs and install its result in ``gm``
    (later calls of a shared layer use it). Returns the installed layers by name.

    The quantized path runs the installed layers; with ``keep_fp32`` an fp32 path runs the
    original modules beside it on its own copies of every value. Under ``torch.no_grad``
    except inside ``on_layer`` (which may optimise).
    """
    device = device_of(gm)
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(
            "sequential quantization needs a model with one input, this one has "
            f"{len(placeholders)}"
        )
    last_use: dict[fx.Node, int] = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last_use[arg] = i
    refusal = sequential_refusal(gm, target.names)  # layers inside opaque blocks
    if refusal is not None:
        raise refusal
    layers = set(target.names)
    originals = dict(target.modules)
    done: dict[str, QuantizedLayer] = {}
    given: dict[str, list[Any]] = {}  # fp32 outputs on_layer computed already
    envs: list[dict[fx.Node, list[Any]]] = [{}, {}] if keep_fp32 else [{}]

    def args_of(env: dict, node: fx.Node, b: int) -> tuple[tuple, dict]:
        args = fx.node.map_arg(node.args, lambda n: env[n][b])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n][b])
        return args, kwargs

    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        for path, env in enumerate(envs):
            if node.op == "placeholder":
                env[node] = [x.to(device) if path == 0 else x.to(device).clone() for x in xs]
                continue
            if node.op == "get_attr":
                value = _fetch_attr(gm, str(node.target))
                env[node] = [value] * len(xs)
                continue
            name = str(node.target)
            if node.op == "call_module" and name in layers:
                if path == 0 and name not in done:
                    xq = [args_of(env, node, b)[0][0] for b in range(len(xs))]
                    xf = (
                        [args_of(envs[1], node, b)[0][0] for b in range(len(xs))]
                        if keep_fp32
                        else None
                    )
                    layer = on_layer(name, originals[name], xq, xf)
                    if isinstance(layer, tuple):
                        layer, given[name] = layer
                    done[name] = layer
                    set_submodule(gm, name, layer)
                if path == 1 and name in given:
                    env[node] = given.pop(name)
                    continue
                module = done[name] if path == 0 else originals[name]
                with torch.no_grad():
                    env[node] = [module(*args_of(env, node, b)[0]) for b in range(len(xs))]
                continue
            with torch.no_grad():
                env[node] = [_call(gm, node, *args_of(env, node, b)) for b in range(len(xs))]
        for arg in node.all_input_nodes:
            if last_use.get(arg) == i:
                for env in envs:
                    env.pop(arg, None)
    missing = [n for n in target.names if n not in done]
    if missing:
        raise ValueError(
            f"layer(s) {', '.join(missing)} saw no input during range calibration; are they used "
            "in forward()?"
        )
    return done


def channel_dim(layer: nn.Module) -> int:
    """The output channel axis of a conv (1) or linear (-1) layer's output."""
    return -1 if isinstance(layer, nn.Linear) or getattr(layer, "kind", "") == "Linear" else 1


def channel_sums(outputs: list[torch.Tensor], dim: int) -> tuple[torch.Tensor, int]:
    """Per-channel sum (float64) over every other axis of a list of outputs, and the count."""
    total, count = None, 0
    for y in outputs:
        y = y.detach().to(torch.float64).movedim(dim, -1)
        s = y.reshape(-1, y.shape[-1]).sum(0)
        total = s if total is None else total + s
        count += y.numel() // y.shape[-1]
    assert total is not None
    return total, count


def clip_fraction(layer: QuantizedLayer, xs: list[torch.Tensor]) -> float:
    """The fraction of the inputs ``xs`` that saturate ``layer``'s activation range."""
    n = sum(x.numel() for x in xs)
    return sum(layer.saturation_count(x) for x in xs) / n if n else float("nan")
