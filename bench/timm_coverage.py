"""Survey: how far quantcal gets on timm CNNs (tracing, quantization coverage, BN folding).

    make test-timm   # once, to build .venv-timm
    .venv-timm/bin/python bench/timm_coverage.py [ARCH ...] [--size 64] [--batch 2]

Needs ``timm`` (not a quantcal dependency). Every model is built with ``pretrained=False`` and
``num_classes=10``, in eval mode, with its BatchNorm statistics and every constant-initialised
1-D parameter (BN gamma/beta, zero-init residual gains, layer scales, biases) randomised, so
that folding or re-parameterization mistakes cannot hide behind identity initialisations. Per
architecture it records:

* whether ``quant.quantize(model, "W8A8", [x])`` traced the model, else the error's first line;
* ``quant_coverage`` (k of n conv/linear computations quantized, the names left in fp32);
* every warning text (200 characters at most) of ``to_deploy`` and ``quantize``;
* ``to_deploy(model)(x)`` vs ``model(x)``: max abs difference / max |model(x)|;
* the quantized model with ``fake_quant_disabled`` vs ``model(x)`` (same measure);
* BatchNorm left in the deploy graph (modules or functional ``batch_norm`` calls) against the
  BatchNorm modules of the model, whether every one of them is named by a warning, and how many
  follow a conv whose only other readers are shape assertions (timm's ``BatchNormAct2d`` runs
  ``_assert(x.ndim == 4)``: the fold would be exact, only that extra reader blocks it);
* an independent scan of the quantized graph for conv/linear/matmul/attention computations that
  are not quantized layers, compared with ``quant_coverage["fp32"]`` (a computation found here
  but not named anywhere is "silent");
* whether the input model was left unmodified;
* the W8A8 logits vs fp32: max abs difference / fp32 logit range (max - min) (random weights:
  deep nets amplify the per-layer error far more than trained ones do);
* the W8A8 logits of the first image alone vs in the batch (same measure; nonzero values come
  from fp32 accumulation-order differences that flip a rounding, not from batch statistics);
* seconds taken.

One line per architecture as it goes, then a Markdown table. Exceptions are caught per model; a
model that timm itself cannot run at the chosen input size is reported as such.
"""

from __future__ import annotations

import argparse
import gc
import operator
import os
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_ARCHS = [
    "resnet18",
    "resnet50d",
    "resnetv2_50x1_bit",
    "nf_resnet26",
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "mobilenetv2_100",
    "regnety_002",
    "ghostnet_100",
    "repvgg_a0",
    "repvgg_a2",
    "mobileone_s0",
    "fastvit_t8",
    "repghostnet_050",
    "densenet121",
    "vgg11_bn",
    "convnext_atto",
    "efficientvit_b0",
    "levit_128s",
    "mobilevit_xxs",
    "dla34",
    "hrnet_w18_small",
    "rexnet_100",
    "tinynet_a",
    "lcnet_050",
    "dpn68b",
    "cspresnet50",
    "selecsls42b",
    "tf_efficientnet_b0",
    "mixnet_s",
    "semnasnet_050",
    "hardcorenas_a",
    "spnasnet_100",
]
#: Pairs of alternatives: only the first that timm knows is surveyed.
ALTERNATIVES = [("repvgg_a0", "repvgg_a2")]

# Computations an integer deploy would run as a conv / matmul (activation x weight or
# activation x activation). Functions are compared by identity (torch.conv2d is F.conv2d, ...).
_MM_FUNCTIONS = {
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
    F.conv_transpose1d: "conv_transpose1d",
    F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d",
    F.linear: "linear",
    F.bilinear: "bilinear",
    torch.matmul: "matmul",
    operator.matmul: "@",
    torch.mm: "mm",
    torch.bmm: "bmm",
    torch.addmm: "addmm",
    torch.baddbmm: "baddbmm",
    torch.addbmm: "addbmm",
    torch.einsum: "einsum",
    torch.tensordot: "tensordot",
    F.scaled_dot_product_attention: "scaled_dot_product_attention",
    F.multi_head_attention_forward: "multi_head_attention_forward",
}
_MM_METHODS = {"matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm", "__matmul__", "einsum"}
#: Kinds that quantcal's own list of functional layers does not include.
_UNLISTED_KINDS = (
    "(bilinear)",
    "(baddbmm)",
    "(addbmm)",
    "(tensordot)",
    "(scaled_dot_product_attention)",
    "(multi_head_attention_forward)",
    "(.addmm)",
    "(.baddbmm)",
    "(.addbmm)",
    "(.__matmul__)",
    "(.einsum)",
)
_BN_FUNCTIONS = {F.batch_norm, torch.batch_norm}
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


@dataclass
class Result:
    arch: str
    traced: str = "?"  # "ok" or the error's first line
    quantized: int | None = None
    total: int | None = None
    fp32: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    deploy_rel: float | None = None
    deploy_error: str = ""
    fq_off_rel: float | None = None
    bn_total: int | None = None  # BatchNorm modules in the model
    bn_left: list[str] = field(default_factory=list)
    bn_unnamed: list[str] = field(default_factory=list)
    bn_assert_only: int = 0  # BN left after a conv read otherwise only by shape asserts
    batch_rel: float | None = None  # q(x[:1]) vs q(x)[:1]
    scan_fp32: list[str] = field(default_factory=list)
    scan_unnamed: list[str] = field(default_factory=list)
    fp32_unnamed: list[str] = field(default_factory=list)
    w8a8_rel: float | None = None
    model_untouched: bool | None = None
    seconds: float = 0.0
    error: str = ""
    notes: list[str] = field(default_factory=list)


def _first_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _short(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random BN statistics and random values for every 1-D parameter that was initialised to
    one constant (BN gamma/beta, zero-init residual gains, layer scales, zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
                rm.copy_(torch.randn(rm.shape, generator=g) * 0.2)
                rv.copy_(torch.rand(rv.shape, generator=g) * 1.5 + 0.5)
        for p in model.parameters():
            if p.dim() != 1 or p.numel() < 2 or not bool((p == p[0]).all()):
                continue
            v = float(p[0])
            if v == 0.0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_((torch.rand(p.shape, generator=g) + 0.5) * max(abs(v), 0.1))


def build(timm: Any, arch: str, size: int) -> nn.Module:
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 10}
    cfg = timm.get_pretrained_cfg(arch)
    if cfg is not None and getattr(cfg, "fixed_input_size", False):
        kwargs["img_size"] = size  # e.g. LeViT: attention biases sized for the input
    return timm.create_model(arch, **kwargs).eval()


def _constants(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    const: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (
            node.op in ("call_function", "call_method", "call_module")
            and all(n in const for n in node.all_input_nodes)
        ):
            const.add(node)
    return const


def _scope(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return str(path[0] if isinstance(path, tuple) else path)


def scan_unquantized(gm: torch.fx.GraphModule) -> list[str]:
    """Conv/linear/matmul/attention computations on activations in ``gm`` that are not
    quantcal quantized layers (independent of quantcal's own bookkeeping). A block fx could not
    trace (``gm.opaque_blocks``) is looked into for conv/linear modules that are not quantized
    layers; what it computes with functions (its attention) only the run-time count sees."""
    from quantcal.quant.apply import QuantizedLayer

    const = _constants(gm)
    opaque = {str(name) for name in getattr(gm, "opaque_blocks", None) or ()}
    out = []
    for node in gm.graph.nodes:
        if node in const:
            continue
        where = _scope(node) or node.name
        if node.op == "call_function" and node.target in _MM_FUNCTIONS:
            out.append(f"{where}:{node.name} ({_MM_FUNCTIONS[node.target]})")
        elif node.op == "call_method" and node.target in _MM_METHODS:
            out.append(f"{where}:{node.name} (.{node.target})")
        elif node.op == "call_module":
            m = gm.get_submodule(str(node.target))
            if isinstance(m, (QuantizedLayer, nn.Embedding, nn.EmbeddingBag)):
                continue
            if str(node.target) in opaque:
                # a block fx could not trace: its conv/linear modules must be quantized layers
                # (by module); its functional products are the run-time count's to name
                out += [
                    f"{node.target}.{name} ({type(sub).__name__}, inside an opaque block)"
                    for name, sub in m.named_modules()
                    if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
                    and not isinstance(sub, QuantizedLayer)
                ]
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or any(
                p.dim() >= 2 for p in m.parameters()
            ):
                out.append(f"{node.target} ({type(m).__name__})")
    return out


def scan_batchnorm(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """(name to look for in a warning, description) of every BatchNorm computation left."""
    const = _constants(gm)
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(str(node.target))
            if isinstance(m, _BN_TYPES):
                out.append((str(node.target), f"{node.target} ({type(m).__name__})"))
        elif node.op == "call_function" and node.target in _BN_FUNCTIONS and node not in const:
            owner = next(
                (
                    str(n.target).rpartition(".")[0]
                    for n in node.all_input_nodes
                    if n.op == "get_attr"
                ),
                node.name,
            )
            out.append((owner, f"{owner} (functional batch_norm)"))
    return out


def _shape_only(node: torch.fx.Node) -> bool:
    """A reader of a tensor's metadata only (x.ndim, x.shape, x.size(), x.dim()) whose results
    feed nothing but assertions and further metadata arithmetic."""
    if node.op == "call_function" and node.target is getattr:
        ok = len(node.args) > 1 and node.args[1] in ("ndim", "shape", "dtype", "device")
    elif node.op == "call_method":
        ok = node.target in ("size", "dim")
    elif node.op == "call_function":
        ok = node.target in (operator.eq, operator.ne, operator.getitem, torch._assert) or (
            getattr(node.target, "__name__", "") == "_assert"
        )
    else:
        ok = False
    return ok and all(_shape_only(u) for u in node.users)


def bn_blocked_by_asserts(gm: torch.fx.GraphModule) -> int:
    """BatchNorm modules left after a conv module whose other readers are all shape-only: the
    fold would be exact, only the extra readers block it."""
    from quantcal.quant.apply import QuantConv

    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(
            gm.get_submodule(str(node.target)), _BN_TYPES
        ):
            continue
        src = node.args[0] if node.args else None
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module"):
            continue
        layer = gm.get_submodule(str(src.target))
        if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, QuantConv)):
            continue
        others = [u for u in src.users if u is not node]
        if others and all(_shape_only(u) for u in others):
            count += 1
    return count


def _rel(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return float((a - b).abs().max()) / max(scale, 1e-12)


def _state_digest(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def survey_one(timm: Any, arch: str, size: int, batch: int, seed: int) -> Result:
    from quantcal import quant
    from quantcal.models.deploy import to_deploy

    r = Result(arch)
    t0 = time.perf_counter()
    try:
        torch.manual_seed(seed)
        model = build(timm, arch, size)
        randomize(model, seed)
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
        try:
            with torch.no_grad():
                ref = model(x)
        except Exception as err:
            r.traced = "-"
            r.error = f"the timm model itself fails on {tuple(x.shape)}: {_first_line(err)}"
            r.seconds = time.perf_counter() - t0
            return r
        before = _state_digest(model)
        r.bn_total = sum(isinstance(m, _BN_TYPES) for m in model.modules())
        scale_max = float(ref.abs().max())
        scale_range = float(ref.max() - ref.min())

        # quantize (also builds the deploy form; its warnings are the ones a user sees)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                q = quant.quantize(model, "W8A8", [x])
                r.traced = "ok"
            except Exception as err:
                q = None
                r.traced = _first_line(err)
                if not isinstance(err, ValueError) or "could not trace" not in str(err):
                    r.error = (
                        "quantize crashed: "
                        + "".join(traceback.format_exception_only(type(err), err))
                        .strip()
                        .splitlines()[0][:300]
                    )
                    r.notes.append(_crash_location(err))
        texts = [f"{w.category.__name__}: {w.message}" for w in caught]
        seen: set[str] = set()
        for t in texts:
            if t not in seen:
                seen.add(t)
                r.warnings.append(_short(t))
        user_texts = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        all_warned = "\n".join(user_texts)

        if q is not None:
            cov = q.quant_coverage
            r.quantized, r.total, r.fp32 = cov["quantized"], cov["total"], list(cov["fp32"])
            r.fp32_unnamed = [n for n in r.fp32 if n not in all_warned]
            r.scan_fp32 = scan_unquantized(q)
            if len(r.scan_fp32) > len(r.fp32):
                # more unquantized computations in the graph than quantcal names: list those of
                # kinds quantcal does not look for, or all of them when none is of such a kind
                unknown = [s for s in r.scan_fp32 if s.endswith(_UNLISTED_KINDS)]
                r.scan_unnamed = unknown or list(r.scan_fp32)
                r.notes.append(
                    f"scan found {len(r.scan_fp32)} unquantized conv/linear/matmul/attention "
                    f"computations, quant_coverage names {len(r.fp32)}"
                )
            with torch.no_grad():
                out_q = q(x)
                with quant.fake_quant_disabled(q):
                    out_off = q(x)
            r.fq_off_rel = _rel(out_off, ref, scale_max)
            r.w8a8_rel = _rel(out_q, ref, scale_range)
            with torch.no_grad():
                r.batch_rel = _rel(q(x[:1]), out_q[:1], scale_range)
            bns = scan_batchnorm(q)
            r.bn_left = [d for _, d in bns]
            r.bn_unnamed = [d for name, d in bns if name not in all_warned]
            r.bn_assert_only = bn_blocked_by_asserts(q)
            if r.bn_assert_only:
                r.notes.append(
                    f"{r.bn_assert_only} of the BN left follow a conv whose only other readers "
                    "are shape assertions (getattr ndim/shape -> torch._assert)"
                )

        # to_deploy on its own (also when quantize failed after tracing)
        if r.traced == "ok" or not r.traced.startswith("ValueError: torch.fx could not trace"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dep = to_deploy(model)
                with torch.no_grad():
                    r.deploy_rel = _rel(dep(x), ref, scale_max)
                if q is None:
                    bns = scan_batchnorm(dep)
                    r.bn_left = [d for _, d in bns]
            except Exception as err:
                r.deploy_error = _first_line(err)
        after = _state_digest(model)
        r.model_untouched = len(before) == len(after) and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(before, after)
        )
        with torch.no_grad():
            ref2 = model(x)
        if not torch.equal(ref, ref2):
            r.model_untouched = False
            r.notes.append("model(x) changed after quantize/to_deploy")
    except Exception as err:
        r.error = r.error or _first_line(err)
        r.notes.append(_crash_location(err))
    r.seconds = time.perf_counter() - t0
    return r


def _crash_location(err: BaseException) -> str:
    """The innermost quantcal frame of a traceback (else the innermost frame)."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "quantcal" in f.filename]
    f = (ours or frames or [None])[-1]
    if f is None:
        return ""
    return f"at {os.path.basename(f.filename)}:{f.lineno} in {f.name}: {f.line}"


def _fmt(v: float | None, ok: float) -> str:
    if v is None:
        return "-"
    return f"{v:.1e}" + ("" if v <= ok else " **!**")


def _bn_cell(r: Result) -> str:
    if r.traced != "ok" and r.deploy_rel is None:
        return "-"
    if not r.bn_left:
        return "0" if r.bn_total is None else f"0/{r.bn_total}"
    total = "?" if r.bn_total is None else str(r.bn_total)
    return f"{len(r.bn_left)}/{total}: " + _short(", ".join(r.bn_left), 70)


def summarize_warnings(r: Result) -> str:
    parts = []
    for w in r.warnings:
        body = w.split(": ", 1)[1] if ": " in w else w
        if body.startswith("quantize:") and "left in fp32" in body:
            parts.append("fp32-left")
        elif body.startswith("to_deploy:"):
            parts.append("BN-unfolded")
        elif "biases beyond" in body:
            parts.append("bias-overflow")
        else:
            parts.append(_short(w, 60))
    return "; ".join(parts) or "none"


def line(r: Result) -> str:
    cov = f"{r.quantized}/{r.total}" if r.total is not None else "-"
    flags = []
    if r.error:
        flags.append(f"ERROR {r.error}")
    if r.fp32_unnamed:
        flags.append(f"fp32 NOT in a warning: {r.fp32_unnamed}")
    if r.scan_unnamed:
        flags.append(f"SILENT fp32: {r.scan_unnamed}")
    if r.bn_unnamed:
        flags.append(f"SILENT BN: {r.bn_unnamed}")
    if r.deploy_error:
        flags.append(f"to_deploy: {r.deploy_error}")
    if r.model_untouched is False:
        flags.append("INPUT MODEL MODIFIED")
    flags += [n for n in r.notes if n]
    return (
        f"{r.arch:24s} traced={r.traced} cov={cov} fp32={r.fp32} bn_left={r.bn_left} "
        f"deploy={_fmt(r.deploy_rel, 1e-4)} fq_off={_fmt(r.fq_off_rel, 1e-4)} "
        f"w8a8={_fmt(r.w8a8_rel, 1.0)} batch1_vs_batch2={_fmt(r.batch_rel, 1e-5)} "
        f"t={r.seconds:.1f}s warnings={r.warnings}" + ("  " + " | ".join(flags) if flags else "")
    )


def table(results: list[Result]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    rows = [
        "| arch | traced | quantized k/n | left in fp32 | BN left/BN in model | deploy rel diff | "
        "fq-off rel diff | W8A8 rel err | warnings | flags | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        flags = []
        if r.error:
            flags.append("crash: " + r.error[:100])
        if r.fp32_unnamed or r.scan_unnamed:
            flags.append("silent fp32")
        if r.bn_unnamed:
            flags.append("silent BN")
        if r.deploy_rel is not None and r.deploy_rel > 1e-4:
            flags.append("deploy mismatch")
        if r.deploy_error:
            flags.append("to_deploy: " + r.deploy_error[:80])
        if r.model_untouched is False:
            flags.append("input modified")
        if r.batch_rel is not None and r.batch_rel > 1e-5:
            flags.append(f"W8A8 batch-1 vs batch-2 logits differ {r.batch_rel:.1e}")
        if r.bn_assert_only:
            flags.append(f"{r.bn_assert_only} BN unfolded only because of shape asserts")
        fp32 = ", ".join(r.fp32)
        traced = "yes" if r.traced == "ok" else ("no: " + r.traced[:220])
        rows.append(
            "| "
            + " | ".join(
                esc(c)
                for c in (
                    r.arch,
                    traced,
                    f"{r.quantized}/{r.total}" if r.total is not None else "-",
                    _short(fp32, 120) or "-",
                    _bn_cell(r),
                    _fmt(r.deploy_rel, 1e-4),
                    _fmt(r.fq_off_rel, 1e-4),
                    _fmt(r.w8a8_rel, 1.0),
                    summarize_warnings(r),
                    "; ".join(flags) or "-",
                    f"{r.seconds:.1f}",
                )
            )
            + " |"
        )
    return "\n".join(rows)


def _source_state() -> str:
    """The quantcal source surveyed: its git commit and whether src/ had local changes."""
    import subprocess

    import quantcal

    src = os.path.dirname(os.path.dirname(os.path.abspath(quantcal.__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", src, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", src, "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return src
    return f"{head}{' + uncommitted changes in src' if dirty else ''} ({src})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", help="timm architectures (default: a CNN list)")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import timm

    archs = args.archs or list(DEFAULT_ARCHS)
    if not args.archs:
        for group in ALTERNATIVES:
            known = [a for a in group if timm.is_model(a)]
            for a in known[1:]:
                archs.remove(a)
    print(
        f"timm {timm.__version__}, torch {torch.__version__}, input {args.batch}x3x{args.size}, "
        f"quantcal {_source_state()}"
    )
    results = []
    for arch in archs:
        if not timm.is_model(arch):
            print(f"{arch:24s} unknown", flush=True)
            continue
        r = survey_one(timm, arch, args.size, args.batch, args.seed)
        results.append(r)
        print(line(r), flush=True)
        gc.collect()
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
