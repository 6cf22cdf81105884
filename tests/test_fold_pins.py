"""models.deploy pinned against independent references: BatchNorm folding re-derived by hand in
float64, the eval-mode model's own outputs, and the documented messages and deploy check.

Each test names the behaviour it pins; together they cover the edge cases of the fold (shared
BatchNorms, frozen layers, shape-only readers, layers the tracer keeps or traces through) and of
the deploy check (the tolerance's boundary, tiny outputs, empty batches, changed shapes)."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantcal.models.deploy import DEPLOY_CHECK_RTOL, fold_bn_weights, to_deploy, trace

_BN = nn.modules.batchnorm._BatchNorm
_LEFT_TAIL = ". They stay as separate layers in the deploy form."
_CHECK_TAIL = (
    "A reparameterize()/fuse()/switch_to_deploy() method or helper changed the outputs; every "
    "number measured on this model is suspect. Check the re-parameterization (or pass the helper "
    "that does it: to_deploy(model, reparameterize=fn))."
)
_TRACE_TAIL = (
    "quantcal rewrites fx graphs, so the model must be symbolically traceable: make control flow "
    "independent of tensor values and shapes, or wrap the offending function with torch.fx.wrap "
    "(a leaf function) and call every conv and linear module outside it: quantize cannot quantize "
    "what runs inside a wrapped function (it names those computations as left in fp32)."
)


def _randomise(bn: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
        if bn.affine:
            bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return bn


def _hand_fold(conv: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """w' = w * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta, one
    output channel at a time with Python floats (float64)."""
    w = conv.weight.detach().double()
    new_w, new_b = torch.empty_like(w), torch.empty(w.shape[0], dtype=torch.float64)
    for c in range(w.shape[0]):
        gamma = float(bn.weight[c].detach()) if bn.affine else 1.0
        beta = float(bn.bias[c].detach()) if bn.affine else 0.0
        bias = float(conv.bias[c].detach()) if conv.bias is not None else 0.0
        scale = gamma / math.sqrt(float(bn.running_var[c]) + bn.eps)
        new_w[c] = w[c] * scale
        new_b[c] = (bias - float(bn.running_mean[c])) * scale + beta
    return new_w, new_b


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _assert_same_function(model: nn.Module, deploy: nn.Module, x: torch.Tensor) -> None:
    ref = _out(copy.deepcopy(model).eval(), x)
    torch.testing.assert_close(_out(deploy, x), ref, rtol=1e-4, atol=1e-5)


def _left_warning(*names: str) -> str:
    return r"could not be folded \([^)]*\): " + re.escape(", ".join(names) + _LEFT_TAIL) + "$"


# ----------------------------------------------------------------------------- fold_bn_weights


def test_fold_is_computed_in_float64_even_from_float32_statistics():
    """The docstring: computed in float64 and cast back to the weight's dtype. A float64 layer
    after a float32 BatchNorm gets the float64 fold of the (exactly widened) statistics, not one
    whose ``var + eps`` was rounded to float32."""
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(3, 6, 3).double()
    bn = _randomise(nn.BatchNorm2d(6, eps=1e-5), seed=1)
    with torch.no_grad():
        bn.running_var.copy_(torch.rand(6, generator=g) * 1e-3 + 1e-6)  # var + eps rounds in f32
    w, b = fold_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    hand_w, hand_b = _hand_fold(conv, bn)
    assert w.dtype == b.dtype == torch.float64
    torch.testing.assert_close(w, hand_w, rtol=1e-13, atol=0.0)
    torch.testing.assert_close(b, hand_b, rtol=1e-13, atol=1e-15)


def test_fold_shape_errors_name_the_statistic():
    w = torch.randn(6, 3, 1, 1)
    good, short = torch.ones(6), torch.ones(3)
    with pytest.raises(ValueError, match=r"^running_mean has shape \(3,\) but the layer has 6 "):
        fold_bn_weights(w, None, short, good, 1e-5)
    with pytest.raises(ValueError, match=r"^running_var has shape \(3,\) but the layer has 6 "):
        fold_bn_weights(w, None, good, short, 1e-5)


# ----------------------------------------------------------------------------- the fold in graphs


def test_a_batchnorm_shared_by_two_convs_is_folded_into_both():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 4, 3, padding=1)
            self.c2 = nn.Conv2d(3, 4, 1, bias=False)
            self.bn = _randomise(nn.BatchNorm2d(4))

        def forward(self, x):
            return self.bn(self.c1(x)) + self.bn(self.c2(x))

    model = Shared().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deploy = to_deploy(model)
    assert not any(isinstance(m, _BN) for m in deploy.modules())
    for name in ("c1", "c2"):
        hand_w, hand_b = _hand_fold(getattr(model, name), model.bn)
        layer = deploy.get_submodule(name)
        torch.testing.assert_close(layer.weight.double(), hand_w, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layer.bias.double(), hand_b, rtol=1e-6, atol=1e-7)
    _assert_same_function(model, deploy, torch.randn(2, 3, 5, 5))


@pytest.mark.parametrize("trainable", [False, True])
def test_folding_keeps_the_layers_requires_grad(trainable):
    """A frozen model's deploy form stays frozen (and a trainable one trainable)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _randomise(nn.BatchNorm2d(4))).eval()
    model.requires_grad_(trainable)
    deploy = to_deploy(model)
    conv = next(m for m in deploy.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.requires_grad is trainable
    assert conv.bias.requires_grad is trainable


def test_the_module_a_helper_returns_is_read_not_written():
    """Folding writes into copies: a deploy-form module the caller holds (returned by a
    ``reparameterize`` helper) keeps its weights."""
    held = nn.Sequential(nn.Conv2d(3, 4, 3), _randomise(nn.BatchNorm2d(4))).eval()
    before = {k: v.clone() for k, v in held.state_dict().items()}
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    deploy = to_deploy(model, reparameterize=lambda m: held)
    after = held.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    _assert_same_function(held, deploy, torch.randn(2, 3, 6, 6))


def test_a_batchnorm_missing_a_running_statistic_is_left_and_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    model[1].running_var = None
    with pytest.warns(UserWarning, match=_left_warning("1")):
        deploy = to_deploy(model)
    assert isinstance(deploy.get_submodule("1"), nn.BatchNorm2d)


def _gain_hook(module, args, kwargs):
    """A forward pre-hook taking a ``gain`` keyword off the call and applying it to the input."""
    return (args[0] * kwargs["gain"],), {}


def test_a_batchnorm_called_with_keywords_is_left_as_it_is():
    """A BatchNorm call carrying a keyword (here read by a forward pre-hook) is not folded:
    folding would drop the call and what it does with the keyword."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = _randomise(nn.BatchNorm2d(4))
            self.bn.register_forward_pre_hook(_gain_hook, with_kwargs=True)

        def forward(self, x):
            return self.bn(self.conv(x), gain=2.0)

    model = Net().eval()
    with pytest.warns(UserWarning, match=_left_warning("bn")):
        deploy = to_deploy(model)
    _assert_same_function(model, deploy, torch.randn(2, 3, 4, 4))


def test_bn1d_after_an_unbatched_conv2d_normalises_rows_and_is_not_folded():
    """Conv2d on an unbatched (C, H, W) input gives a 3-D tensor, which BatchNorm1d normalises
    along H, not along the conv's output channels: even with as many features as channels it must
    not be folded into the conv."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _randomise(nn.BatchNorm1d(4))).eval()
    x = torch.randn(3, 4, 5)
    with pytest.warns(UserWarning, match=_left_warning("1")):
        deploy = to_deploy(model)
    _assert_same_function(model, deploy, x)


@pytest.mark.xfail(
    strict=True,
    reason="BUG: Conv1d -> BatchNorm1d is folded even though on an "
    "unbatched (C, L) input BatchNorm1d normalises along L, not the conv channels",
)
def test_bn1d_after_an_unbatched_conv1d_computes_the_models_function():
    model = nn.Sequential(nn.Conv1d(3, 4, 1), _randomise(nn.BatchNorm1d(4))).eval()
    x = torch.randn(3, 4)  # unbatched: (C_in, L), and L equals the BN's features
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deploy = to_deploy(model)
    _assert_same_function(model, deploy, x)


def test_folding_a_conv_whose_weight_is_also_read_keeps_the_function():
    """A conv whose weight the forward also reads directly is not folded (that read would see
    the folded weight): the BatchNorm is left, and named, and the function is kept."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = _randomise(nn.BatchNorm2d(4))

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv.weight.sum()

    model = Net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deploy = to_deploy(model)
    _assert_same_function(model, deploy, torch.randn(2, 3, 4, 4))


def test_a_batchnorm_whose_parameters_the_forward_reads_is_not_folded():
    """Reading the BatchNorm's own parameters directly (``self.bn.weight``) also blocks the
    fold: the BatchNorm is left, and named, and the function is kept. (A buffer read such as
    ``running_mean.sum()`` is a constant to fx, taken at trace time.)"""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = _randomise(nn.BatchNorm2d(4))

        def forward(self, x):
            return self.bn(self.conv(x)) + self.bn.weight.sum()

    model = Net().eval()
    with pytest.warns(UserWarning, match="bn"):
        deploy = to_deploy(model)
    assert any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    _assert_same_function(model, deploy, torch.randn(2, 3, 4, 4))


def test_an_unrelated_direct_parameter_read_does_not_block_folding():
    """Only reads of the conv's or the BatchNorm's own parameters block the fold; a model that
    reads another parameter directly (a learned scale) still has its BatchNorm folded."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = _randomise(nn.BatchNorm2d(4))
            self.scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return self.bn(self.conv(x)) * self.scale

    model = Net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unfolded to warn about
        deploy = to_deploy(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    _assert_same_function(model, deploy, torch.randn(2, 3, 4, 4))


# ----------------------------------------------------------------------------- who reads the conv


@torch.fx.wrap
def _scaled(x: torch.Tensor, mode: str) -> torch.Tensor:
    """A leaf function whose second argument is a string tag; it reads ``x``'s values."""
    return x * 2.0 if mode == "shape" else x


class _Readers(nn.Module):
    """conv -> bn, with the conv output also read in the way ``kind`` names."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = _randomise(nn.BatchNorm2d(4))

    def forward(self, x):
        z = self.conv(x)
        if self.kind == "size_dim":  # shape-only readers, before the BatchNorm
            n, d = z.size(1), z.dim()
            return self.bn(z) * (n / d)
        if self.kind == "method":  # a value reader through a tensor method
            return self.bn(z) + z.mul(0.5)
        return self.bn(z) + _scaled(z, "shape")  # a value reader whose 2nd argument is a string


def test_size_and_dim_readers_do_not_stop_the_fold():
    model = _Readers("size_dim").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deploy = to_deploy(model)
    assert not any(isinstance(m, _BN) for m in deploy.modules())
    _assert_same_function(model, deploy, torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize("kind", ["method", "function"])
def test_a_second_value_reader_stops_the_fold(kind):
    model = _Readers(kind).eval()
    with pytest.warns(UserWarning, match=_left_warning("bn")):
        deploy = to_deploy(model)
    assert isinstance(deploy.get_submodule("bn"), nn.BatchNorm2d)
    _assert_same_function(model, deploy, torch.randn(2, 3, 6, 6))


# ----------------------------------------------------------------------------- functional BNs


class _BNAct(nn.BatchNorm2d):
    """A fused BatchNorm + ReLU (timm's BatchNormAct2d style): fx traces through to F.batch_norm."""

    def forward(self, x):
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return torch.relu(x)


class _AfterAdds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.plain = _randomise(nn.BatchNorm2d(4))
        self.stage = nn.Module()
        self.stage.norm = _randomise(_BNAct(4), seed=1)

    def forward(self, x):
        y = self.plain(self.conv(x) + 1.0)  # not after a conv: left
        return self.stage.norm(y + 1.0)  # a functional call not after a conv: left


def test_unfolded_batchnorms_are_listed_module_and_functional():
    model = _AfterAdds().eval()
    names = ("plain", "stage.norm (functional batch_norm)")
    with pytest.warns(
        UserWarning, match=r"^to_deploy: 2 BatchNorm layer\(s\) " + _left_warning(*names)
    ):
        deploy = to_deploy(model)
    _assert_same_function(model, deploy, torch.randn(2, 3, 4, 4))


def test_a_functional_batchnorm_without_weights_is_named_by_its_node():
    class BatchStats(nn.Module):
        def forward(self, x):
            return F.batch_norm(x, None, None, training=True)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchStats())
    with pytest.warns(UserWarning, match=_left_warning("batch_norm (functional batch_norm)")):
        to_deploy(model)


# ----------------------------------------------------------------------------- deploy methods


class _Fused(nn.Module):
    """The deploy form the blocks below return: x * 3 as one op (the branches merged)."""

    def forward(self, x):
        return x * 3.0


class _Branchy(nn.Module):
    """x + x + x in three branches; its deploy methods record in ``_RAN`` that they ran."""

    def forward(self, x):
        return x + x + x


_RAN: list[str] = []


def _deployed_by(block: _Branchy) -> list[str]:
    """The deploy methods ``to_deploy`` ran on the block (checking the returned form is used)."""
    _RAN.clear()
    deploy = to_deploy(nn.Sequential(block))
    x = torch.randn(2, 3)
    torch.testing.assert_close(_out(deploy, x), 3 * x)
    assert "mul" in deploy.code and "add" not in deploy.code  # the returned form was traced
    return list(_RAN)


def test_a_fuse_needing_arguments_is_skipped_for_reparameterize():
    class Block(_Branchy):
        def fuse(self, modules_to_fuse):  # another API's fuse: needs an argument
            raise AssertionError("must not be called")

        def reparameterize(self, inplace=False):  # defaults are fine
            _RAN.append("reparameterize")
            return _Fused()

    assert _deployed_by(Block()) == ["reparameterize"]


def test_a_fuse_taking_only_star_args_is_called():
    class Block(_Branchy):
        def fuse(self, *modules, **options):
            _RAN.append("fuse")
            return _Fused()

        def reparameterize(self):
            raise AssertionError("fuse comes first")

    assert _deployed_by(Block()) == ["fuse"]


class _Opaque:
    """A callable whose signature cannot be read (inspect.signature raises TypeError)."""

    __signature__ = "not a signature"

    def __call__(self, *args):
        raise AssertionError("must not be called")


def test_a_method_without_a_readable_signature_is_skipped_for_the_next():
    class Block(_Branchy):
        fuse = _Opaque()

        def reparameterize(self):
            _RAN.append("reparameterize")
            return _Fused()

    assert _deployed_by(Block()) == ["reparameterize"]


def test_a_deploy_method_returning_a_non_module_names_block_method_and_type():
    class Odd(_Branchy):
        def reparameterize(self):
            return 3

    msg = r"^Odd\.reparameterize\(\) must return an nn\.Module or None \(in place\), got int$"
    with pytest.raises(TypeError, match=msg):
        to_deploy(nn.Sequential(Odd()))


# ----------------------------------------------------------------------------- the tracer


class _WSConv2d(nn.Conv2d):
    """Weight-standardized conv: a subclass with its own forward, traced through and lifted."""

    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        w = w / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _LibConv2d(nn.Conv2d):
    """A library's own Conv2d that keeps torch's forward: it stays a module of its class."""


class _LibLinear(nn.Linear):
    pass


def test_a_conv_subclass_with_its_own_forward_folds_the_weight_it_computes_with():
    model = nn.Sequential(_WSConv2d(3, 4, 3), _randomise(nn.BatchNorm2d(4))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deploy = to_deploy(model)
    assert not any(isinstance(m, (_BN, _WSConv2d)) for m in deploy.modules())
    _assert_same_function(model, deploy, torch.randn(2, 3, 6, 6))


def test_layer_subclasses_keeping_torchs_forward_stay_modules_of_their_class():
    model = nn.Sequential(
        _LibConv2d(3, 4, 3), _randomise(nn.BatchNorm2d(4)), nn.Flatten(), _LibLinear(16, 2)
    ).eval()
    deploy = to_deploy(model)
    assert [type(m) for m in deploy.children()] == [_LibConv2d, nn.Flatten, _LibLinear]
    _assert_same_function(model, deploy, torch.randn(2, 3, 4, 4))


class _Flip(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


def test_a_top_level_trace_failure_names_the_model_the_error_and_the_fix():
    msg = (
        "torch.fx could not trace _Flip: the error arose in the top-level module (_Flip): "
        "TraceError: "
    )
    with pytest.raises(ValueError, match="^" + re.escape(msg) + r".*" + re.escape(_TRACE_TAIL)):
        trace(_Flip())


def test_a_trace_failure_in_an_unregistered_module_says_so():
    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.helpers = [_Flip()]  # a plain list: not a registered submodule

        def forward(self, x):
            return self.helpers[0](self.conv(x))

    with pytest.raises(ValueError, match=re.escape("in submodule '<unregistered _Flip>' (_Flip)")):
        to_deploy(Hidden())


# ----------------------------------------------------------------------------- to_deploy's API


def test_type_errors_name_what_was_passed():
    with pytest.raises(TypeError, match=r"^to_deploy needs an nn\.Module, got str$"):
        to_deploy("not a model")
    model = nn.Sequential(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match=r"^reparameterize must be callable, got int$"):
        to_deploy(model, reparameterize=3)
    with pytest.raises(TypeError, match=r"\(in place\), got str$"):
        to_deploy(model, reparameterize=lambda m: "done")


def test_the_deploy_form_keeps_the_models_class_name_and_plain_attributes():
    class Net(nn.Sequential):
        pass

    model = Net(nn.Conv2d(3, 4, 1), _randomise(nn.BatchNorm2d(4)))
    model.labels, model.info = ["cat", "dog"], {"source": "paper", "sizes": [32, 64]}
    model._private = 7
    model.meta, model.code = {"source": "mine"}, "rn18"  # names GraphModule itself uses
    deploy = to_deploy(model)
    assert type(deploy).__name__ == "Net"
    assert deploy.labels == ["cat", "dog"] and deploy.info == model.info
    assert not hasattr(deploy, "_private")  # public attributes only
    assert "source" not in deploy.meta and "def forward" in deploy.code  # not overwritten
    deploy.labels.append("bird")
    deploy.info["sizes"].append(128)  # deep copies: nothing nested is shared with the model
    assert model.labels == ["cat", "dog"] and model.info == {"source": "paper", "sizes": [32, 64]}
    assert deploy.deploy_check is None  # no check_input: nothing measured


# ----------------------------------------------------------------------------- the deploy check


class _Add(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x):
        return x + self.c


class _Crop(nn.Module):
    def forward(self, x):
        return x[:, :2]


class _Pair(nn.Module):
    def forward(self, x):
        return x, x


def _check_warning(n: int, diff: str, scale: str) -> str:
    text = (
        "to_deploy: the deploy form does not compute the model's function: on "
        f"{n} input(s) max |deploy - model| = {diff} against max |model| = {scale}. " + _CHECK_TAIL
    )
    return "^" + re.escape(text) + "$"


def test_the_check_tolerates_exactly_the_documented_relative_difference():
    """More than DEPLOY_CHECK_RTOL of the largest output warns; exactly that much does not."""
    x = torch.full((1, 4), 1000.0)
    assert DEPLOY_CHECK_RTOL * 1000.0 == 1.0  # a difference of 1.0 sits on the boundary
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deploy = to_deploy(_Add(0.0), reparameterize=lambda m: _Add(1.0), check_input=x)
    assert deploy.deploy_check == {"max_abs_diff": 1.0, "max_abs_output": 1000.0}
    with pytest.warns(UserWarning, match=_check_warning(1, "1.01", "1e+03")):
        to_deploy(_Add(0.0), reparameterize=lambda m: _Add(1.0078125), check_input=x)


def test_the_check_is_relative_for_small_outputs_too():
    x = torch.full((3, 2), 1e-3)
    with pytest.warns(UserWarning, match=_check_warning(3, "0.0001", "0.001")):
        deploy = to_deploy(nn.Identity(), reparameterize=lambda m: _Add(1e-4), check_input=x)
    assert deploy.deploy_check["max_abs_diff"] == pytest.approx(1e-4, rel=1e-3)


def test_the_check_on_an_empty_batch_finds_nothing_to_compare():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _randomise(nn.BatchNorm2d(4))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deploy = to_deploy(model, check_input=torch.randn(0, 3, 5, 5))
    assert deploy.deploy_check == {"max_abs_diff": 0.0, "max_abs_output": 0.0}


@pytest.mark.parametrize("batch", [2, 0])
def test_a_deploy_form_with_another_output_shape_is_infinitely_off(batch):
    x = torch.randn(batch, 3)
    scale = float(x.abs().max()) if batch else 0.0
    with pytest.warns(UserWarning, match=_check_warning(batch, "inf", f"{scale:.3g}")):
        deploy = to_deploy(nn.Identity(), reparameterize=lambda m: _Crop(), check_input=x)
    assert deploy.deploy_check == {"max_abs_diff": math.inf, "max_abs_output": scale}


def test_a_deploy_form_returning_a_non_tensor_is_not_compared():
    deploy = to_deploy(nn.Identity(), reparameterize=lambda m: _Pair(), check_input=torch.ones(2))
    assert deploy.deploy_check is None


def test_an_ill_conditioned_fold_is_named_as_the_fold_not_a_reparameterization():
    """Issue #26: a BatchNorm with a running variance near 1e-9 makes the float32 fold drift;
    the deploy check says the fold did it (the graph before folding computes the model's
    function) and names the three BatchNorms with the smallest running variances, instead of
    blaming a reparameterize() the model lacks. Other modules with running statistics (an
    InstanceNorm) are not BatchNorms and are not listed."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(1 if i == 0 else 4, 4, 3, padding=1) for i in range(4)]
    bns = [nn.BatchNorm2d(4, eps=1e-10) for _ in range(4)]
    net = nn.Sequential(
        convs[0],
        bns[0],
        convs[1],
        bns[1],
        convs[2],
        bns[2],
        convs[3],
        bns[3],
        nn.InstanceNorm2d(4, track_running_stats=True),
        nn.Flatten(),
        nn.Linear(64, 3),
    ).eval()
    with torch.no_grad():
        for i, bn in enumerate(bns):
            bn.running_var.fill_(10.0 ** (i - 9))  # 1e-09, 1e-08, 1e-07, 1e-06
        bns[0].running_mean.fill_(1e5)
        convs[0].bias.fill_(1e5)
        net[8].running_var.fill_(1e-12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deploy = to_deploy(net, check_input=torch.randn(8, 1, 4, 4))
    (message,) = [str(w.message) for w in caught if "does not compute" in str(w.message)]
    check = deploy.deploy_check
    assert message == (
        "to_deploy: the deploy form does not compute the model's function: on 8 input(s) max "
        f"|deploy - model| = {check['max_abs_diff']:.3g} against max |model| = "
        f"{check['max_abs_output']:.3g}. The graph computes it before its BatchNorms are folded "
        "(max |difference| 0), so folding the BatchNorms changed the outputs: a running variance "
        "near zero scales the conv by 1/sqrt(var + eps) and float32 rounding with it; smallest: "
        "1 (running variance 1e-09, eps 1e-10), 3 (running variance 1e-08, eps 1e-10), "
        "5 (running variance 1e-07, eps 1e-10). Every number measured on this model is suspect: "
        "check those statistics (re-estimate them, or raise eps)."
    )
    assert check["max_abs_diff"] > DEPLOY_CHECK_RTOL * check["max_abs_output"]
