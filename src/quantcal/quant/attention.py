"""Attention decomposed into quantizable parts: ``F.scaled_dot_product_attention`` calls and
``nn.MultiheadAttention`` leaf modules of a deploy graph become the same function written as
linear projections (quantized as ordinary linear layers), two activation x activation products
(``quant.matmul.QuantMatMul``: ``Q Kᵀ`` and ``A V``) and a float softmax (issue #26 item 2).

The decomposition is the one torch documents for both (``torch.nn.functional.
scaled_dot_product_attention``'s reference implementation; ``F.multi_head_attention_forward``;
Vaswani et al., "Attention Is All You Need", NeurIPS 2017, §3.2)::

    S = (Q Kᵀ) * scale + M          scale = 1 / sqrt(d) unless given; M the mask (0 or -inf
    A = softmax(S, -1)              for a boolean one, the values for a float one)
    O = A V

``MultiheadAttention`` adds ``Q = x_q W_qᵀ + b_q`` (likewise K, V) per head and
``out_proj(concat_h O_h)``. Where the mask is applied (``apply_sdpa_mask``,
``apply_mha_masks``), the causal mask and the check that inputs are batched run as leaf
functions of the graph (fx cannot trace shape-dependent code), with no product inside.

``decompose_attention(gm, make)`` rewrites a graph in place; what it cannot decompose it
refuses with a ValueError naming the call and the reason (dropout in the deploy graph, grouped
query attention, ``add_bias_kv`` / ``add_zero_attn``, unbatched inputs, masks given as
non-constants where flags are expected).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from quantcal.quant.matmul import QuantMatMul, free_name, module_scope

__all__ = [
    "MultiheadAttentionParts",
    "ScaledDotProductAttention",
    "apply_mha_masks",
    "apply_sdpa_mask",
    "check_batched",
    "decompose_attention",
]

_SDPA_ARGS = (
    "query",
    "key",
    "value",
    "attn_mask",
    "dropout_p",
    "is_causal",
    "scale",
    "enable_gqa",
)
_MHA_ARGS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)


def apply_sdpa_mask(
    scores: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
) -> torch.Tensor:
    """``scores`` (``(..., L, S)``) with SDPA's masks: ``is_causal`` keeps ``j <= i``; a boolean
    ``attn_mask`` keeps its True positions (the rest -inf), a float one is added."""
    if is_causal:
        L, S = scores.shape[-2], scores.shape[-1]
        keep = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return scores


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``nn.MultiheadAttention``'s boolean masks are True where attention is *not* allowed."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


def apply_mha_masks(
    scores: torch.Tensor, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """``scores`` (``(N, H, L, S)``) plus ``nn.MultiheadAttention``'s masks as it canonicalizes
    them: ``attn_mask`` ``(L, S)`` or ``(N * H, L, S)``, ``key_padding_mask`` ``(N, S)``; boolean
    True (not allowed) is -inf, float values are added."""
    n, h, length, s = scores.shape
    if attn_mask is not None:
        m = _float_mask(attn_mask, scores.dtype)
        scores = scores + (m.reshape(n, h, length, s) if m.dim() == 3 else m)
    if key_padding_mask is not None:
        scores = scores + _float_mask(key_padding_mask, scores.dtype).reshape(n, 1, 1, s)
    return scores


def check_batched(query: torch.Tensor, what: str) -> torch.Tensor:
    """``query`` itself when it is 3-D (batched); a ValueError otherwise."""
    if query.dim() != 3:
        raise ValueError(
            f"{what}: quantize decomposes nn.MultiheadAttention for batched (3-D) inputs only, "
            f"got a {query.dim()}-D query; add a batch dimension"
        )
    return query


class ScaledDotProductAttention(nn.Module):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale)`` as
    ``softmax(qk(q, kᵀ) * scale + mask) -> av(A, v)`` with ``qk`` and ``av`` ``QuantMatMul``s."""

    def __init__(self, qk: QuantMatMul, av: QuantMatMul, *, is_causal: bool, scale: Any) -> None:
        super().__init__()
        self.qk, self.av = qk, av
        self.is_causal = bool(is_causal)
        self.scale = None if scale is None else float(scale)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        scale = query.size(-1) ** -0.5 if self.scale is None else self.scale
        scores = self.qk(query, key.transpose(-2, -1)) * scale
        scores = apply_sdpa_mask(scores, attn_mask, self.is_causal)
        return self.av(scores.softmax(-1), value)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None)
    layer = layer.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.eval()


class MultiheadAttentionParts(nn.Module):
    """An eval-mode ``nn.MultiheadAttention`` call as ``q_proj``/``k_proj``/``v_proj`` and
    ``out_proj`` ``nn.Linear`` layers, ``qk``/``av`` ``QuantMatMul``s and a float softmax, with
    the call's flags (``need_weights``, ``average_attn_weights``) fixed. Refuses
    ``add_bias_kv`` and ``add_zero_attn``."""

    def __init__(
        self,
        mha: nn.MultiheadAttention,
        qk: QuantMatMul,
        av: QuantMatMul,
        *,
        need_weights: bool = True,
        average_attn_weights: bool = True,
        where: str = "nn.MultiheadAttention",
    ) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                f"{where}: quantize cannot decompose nn.MultiheadAttention with add_bias_kv or "
                "add_zero_attn; pass QuantConfig(quantize_matmuls=False) to keep it in fp32"
            )
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight.detach().split(e)
        else:
            wq, wk, wv = (
                mha.q_proj_weight.detach(),
                mha.k_proj_weight.detach(),
                mha.v_proj_weight.detach(),
            )
        b = mha.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.detach().split(e)
        self.q_proj, self.k_proj, self.v_proj = _linear(wq, bq), _linear(wk, bk), _linear(wv, bv)
        out = mha.out_proj
        self.out_proj = _linear(out.weight.detach(), None if out.bias is None else out.bias)
        self.qk, self.av = qk, av
        self.num_heads, self.head_dim, self.embed_dim = mha.num_heads, mha.head_dim, e
        self.batch_first = bool(mha.batch_first)
        self.need_weights = bool(need_weights)
        self.average_attn_weights = bool(average_attn_weights)
        self.where = where

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query = check_batched(query, self.where)
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length = query.size(0), query.size(1)
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(n, length, h, d).transpose(1, 2)
        k = self.k_proj(key).reshape(n, -1, h, d).transpose(1, 2)
        v = self.v_proj(value).reshape(n, -1, h, d).transpose(1, 2)
        scores = self.qk(q, k.transpose(-2, -1)) * (float(d) ** -0.5)
        attn = apply_mha_masks(scores, attn_mask, key_padding_mask).softmax(-1)
        out = self.av(attn, v).transpose(1, 2).reshape(n, length, self.embed_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not self.need_weights:
            return out, None
        return out, attn.mean(1) if self.average_attn_weights else attn


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        super().__init__(autowrap_functions=(apply_sdpa_mask, apply_mha_masks, check_batched))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (QuantMatMul, nn.Linear)) or super().is_leaf_module(
            m, module_qualified_name
        )


def _bind(node: fx.Node, names: tuple[str, ...], first: int = 0) -> dict[str, Any]:
    """The call's arguments by name (positional ones from ``node.args[first:]``)."""
    bound = dict(zip(names, node.args[first:]))
    for key, value in node.kwargs.items():
        if key not in names:
            raise ValueError(f"{node.name}: unexpected argument {key!r} for {names[0]}...")
        bound[key] = value
    return bound


def _inline(
    gm: fx.GraphModule, node: fx.Node, path: str, module: nn.Module, inputs: dict[str, Any]
) -> Any:
    """Install ``module`` at ``path`` and put its traced forward in ``gm`` before ``node``,
    fed ``inputs`` (graph nodes by argument name; absent or None ones are traced as None).
    Returns the inlined output (a node, or a tuple of nodes / None)."""
    gm.add_submodule(path, module)
    tensors = {k: v for k, v in inputs.items() if isinstance(v, fx.Node)}
    params = [p for p in _forward_params(module) if p not in tensors]
    sub = _Tracer().trace(module, concrete_args=dict.fromkeys(params))
    val_map: dict[fx.Node, Any] = {}
    for n in sub.nodes:
        if n.op == "placeholder":
            val_map[n] = tensors.get(str(n.target).lstrip("*"))
        elif n.op in ("call_module", "get_attr"):
            n.target = f"{path}.{n.target}"
    with gm.graph.inserting_before(node):
        out = gm.graph.graph_copy(sub, val_map)
    for n, new in val_map.items():
        if isinstance(new, fx.Node) and n.op != "placeholder":
            new.meta.setdefault("nn_module_stack", {path: (path, type(module))})
    return out


def _forward_params(module: nn.Module) -> list[str]:
    import inspect as _inspect

    return [p for p in _inspect.signature(module.forward).parameters if p != "self"]


def _constant(value: Any, name: str, where: str) -> Any:
    if isinstance(value, fx.Node):
        raise ValueError(
            f"{where}: {name} is computed in the graph; quantize decomposes attention only with "
            f"{name} a constant (pass QuantConfig(quantize_matmuls=False) to keep it in fp32)"
        )
    return value


def _replace_tuple(gm: fx.GraphModule, node: fx.Node, outputs: tuple[Any, ...], where: str) -> None:
    """Point the users of ``node`` (a call returning a tuple) at ``outputs``."""
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem:
            value = outputs[user.args[1]]  # type: ignore[index]
            if value is None:
                if user.users:
                    raise ValueError(f"{where}: the attention weights it does not return are read")
                gm.graph.erase_node(user)
            else:
                user.replace_all_uses_with(value)
                gm.graph.erase_node(user)
        else:
            with gm.graph.inserting_before(user):
                packed = gm.graph.call_function(tuple, (list(outputs),))
            user.replace_input_with(node, packed)


def decompose_attention(gm: fx.GraphModule, make: Callable[[str], QuantMatMul]) -> list[str]:
    """Rewrite every ``F.scaled_dot_product_attention`` call and every ``nn.MultiheadAttention``
    leaf call of ``gm`` into its decomposition (see the module docstring), with the two
    products made by ``make("matmul")``. Returns the paths of the decomposition modules
    installed (each holds its ``qk`` and ``av`` products; a MultiheadAttention's projections
    are its ``*_proj`` linears). ``gm`` is recompiled; the fp32 function is unchanged up to
    float rounding."""
    done: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            done.append(_decompose_sdpa(gm, node, make))
        elif node.op == "call_module" and isinstance(
            gm.get_submodule(str(node.target)), nn.MultiheadAttention
        ):
            done.append(_decompose_mha(gm, node, make))
    if done:
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
    return done


def _decompose_sdpa(gm: fx.GraphModule, node: fx.Node, make: Callable[[str], QuantMatMul]) -> str:
    args = _bind(node, _SDPA_ARGS)
    where = f"scaled_dot_product_attention call {node.name!r}"
    dropout = _constant(args.get("dropout_p", 0.0), "dropout_p", where)
    if dropout:
        raise ValueError(
            f"{where} has dropout_p={dropout} in the deploy graph: scaled_dot_product_attention "
            "drops attention weights at random even in eval mode, so the model is not a fixed "
            "function; pass dropout_p=0.0 outside training"
        )
    if _constant(args.get("enable_gqa", False), "enable_gqa", where):
        raise ValueError(
            f"{where} uses enable_gqa=True (grouped query attention), which quantize does not "
            "decompose; pass QuantConfig(quantize_matmuls=False) to keep it in fp32"
        )
    is_causal = _constant(args.get("is_causal", False), "is_causal", where)
    scale = _constant(args.get("scale"), "scale", where)
    module = ScaledDotProductAttention(
        make("matmul"), make("matmul"), is_causal=is_causal, scale=scale
    )
    base = module_scope(node)
    path = free_name(gm, f"{base}.sdpa" if base else "sdpa")
    inputs = {k: args.get(k) for k in ("query", "key", "value", "attn_mask")}
    out = _inline(gm, node, path, module, inputs)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return path


def _decompose_mha(gm: fx.GraphModule, node: fx.Node, make: Callable[[str], QuantMatMul]) -> str:
    target = str(node.target)
    mha = gm.get_submodule(target)
    where = f"nn.MultiheadAttention {target!r}"
    args = _bind(node, _MHA_ARGS)
    need_weights = _constant(args.get("need_weights", True), "need_weights", where)
    average = _constant(args.get("average_attn_weights", True), "average_attn_weights", where)
    is_causal = _constant(args.get("is_causal", False), "is_causal", where)
    if is_causal and not isinstance(args.get("attn_mask"), fx.Node):
        raise ValueError(
            f"{where} is called with is_causal=True and no attn_mask (nn.MultiheadAttention "
            "refuses that itself); pass the causal mask as attn_mask"
        )
    module = MultiheadAttentionParts(
        mha,
        make("matmul"),
        make("matmul"),
        need_weights=bool(need_weights),
        average_attn_weights=bool(average),
        where=where,
    )
    path = free_name(gm, target + "_parts")
    inputs = {k: args.get(k) for k in ("query", "key", "value", "key_padding_mask", "attn_mask")}
    out = _inline(gm, node, path, module, inputs)
    _replace_tuple(gm, node, tuple(out), where)
    gm.graph.erase_node(node)
    return path
