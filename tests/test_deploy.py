"""models.deploy: reparameterization + generic BatchNorm folding, against the eval-mode original."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from quantcal import quant
from quantcal.models.deploy import fold_bn_weights, to_deploy, trace

models = pytest.importorskip("quantcal.models")
_BN = nn.modules.batchnorm._BatchNorm


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-identity BN statistics and affine parameters, so folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BN):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_equivalent(model: nn.Module, deploy: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x)
        out = deploy(x)
    scale = ref.abs().max().clamp_min(1e-12)
    assert (out - ref).abs().max() / scale < 1e-4


# ----------------------------------------------------------------------------- the math


def test_fold_bn_weights_matches_torch_fusion_helper():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(6, 3, 3, 3, generator=g), torch.randn(6, generator=g)
    mean, var = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.1
    gamma, beta = torch.randn(6, generator=g), torch.randn(6, generator=g)
    for bias in (b, None):
        ours = fold_bn_weights(w, bias, mean, var, 1e-5, gamma, beta)
        ref = fuse_conv_bn_weights(w, bias, mean, var, 1e-5, gamma, beta)
        torch.testing.assert_close(ours[0], ref[0].detach())
        torch.testing.assert_close(ours[1], ref[1].detach())
    # affine=False BatchNorm: gamma 1, beta 0
    ours = fold_bn_weights(w, None, mean, var, 1e-3)
    expected = w / torch.sqrt(var + 1e-3).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(ours[0], expected)
    torch.testing.assert_close(ours[1], -mean / torch.sqrt(var + 1e-3))
    with pytest.raises(ValueError, match="running_mean"):
        fold_bn_weights(w, None, mean[:3], var, 1e-5)


# ----------------------------------------------------------------------------- generic models


class _Custom(nn.Module):
    """Conv-BN pairs in several shapes: shared input, BN after a non-conv, a reused conv output."""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 5
        self.note = "kept"
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b2 = nn.BatchNorm2d(8, affine=False)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.b3 = nn.BatchNorm2d(8)
        self.b4 = nn.BatchNorm2d(8)  # after an add: cannot be folded
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(x))
        z = self.c3(y)
        z = self.b3(z) + z  # c3's output feeds b3 and the add: not foldable
        z = self.b4(z + x)
        return self.fc(z.mean((2, 3)))


class _Block(nn.Module):
    """A two-branch block whose ``reparameterize`` returns its fused form (quantcal's MobileOne)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.b = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(self.a(x) + self.b(x))

    def reparameterize(self) -> nn.Module:
        ka, ba = fold_bn_weights(
            self.a[0].weight,
            None,
            self.a[1].running_mean,
            self.a[1].running_var,
            self.a[1].eps,
            self.a[1].weight,
            self.a[1].bias,
        )
        kb, bb = fold_bn_weights(
            self.b[0].weight,
            None,
            self.b[1].running_mean,
            self.b[1].running_var,
            self.b[1].eps,
            self.b[1].weight,
            self.b[1].bias,
        )
        conv = nn.Conv2d(ka.shape[0], ka.shape[0], 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(ka + nn.functional.pad(kb, (1, 1, 1, 1)))
            conv.bias.copy_(ba + bb)
        return nn.Sequential(conv, nn.ReLU())


class _InPlaceBlock(_Block):
    """The public-library convention (timm's MobileOneBlock, RepVGG, FastViT, RepGhost):
    ``reparameterize()`` rewrites the block itself, deletes its branches and returns None."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.reparam_conv: nn.Module | None = None

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return super().forward(x)

    def reparameterize(self) -> None:
        if self.reparam_conv is not None:  # already done
            return
        self.reparam_conv = super().reparameterize()
        del self.a, self.b


def test_in_place_reparameterize_returning_none_is_accepted():
    model = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), _InPlaceBlock(4), _InPlaceBlock(4)))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every BatchNorm folded: no warning
        deploy = to_deploy(model)
    assert not any(isinstance(m, _BN) for m in deploy.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in deploy.modules()) == 3
    _assert_equivalent(model, deploy, torch.randn(2, 3, 9, 9))
    assert all(m.reparam_conv is None for m in model.modules() if isinstance(m, _InPlaceBlock))
    again = to_deploy(deploy)  # the deploy form deploys to the same function
    _assert_equivalent(deploy, again, torch.randn(2, 3, 9, 9))


def test_reparameterize_returning_something_else_is_a_clear_error():
    class Odd(nn.Module):
        def forward(self, x):
            return x

        def reparameterize(self):
            return 3

    with pytest.raises(TypeError, match=r"must return an nn.Module or None \(in place\)"):
        to_deploy(nn.Sequential(nn.Conv2d(3, 3, 1), Odd()))


def test_custom_model_folds_what_it_can_and_warns_about_the_rest():
    model = _randomise_bn(_Custom())
    before = _state(model)
    with pytest.warns(UserWarning, match="b3.*b4|b4.*b3"):
        deploy = to_deploy(model)
    bns = [n for n, m in deploy.named_modules() if isinstance(m, _BN)]
    assert sorted(bns) == ["b3", "b4"]
    assert not deploy.training
    assert deploy.num_classes == 5 and deploy.note == "kept"
    _assert_equivalent(model, deploy, torch.randn(4, 3, 10, 10))
    assert model.training  # the input is untouched
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_reparameterize_returning_a_module_replaces_the_block_and_input_untouched():
    model = _randomise_bn(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), _Block(4), _Block(4))
    )
    model.eval()
    before = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deploy = to_deploy(model)
    assert not any(isinstance(m, (_BN, _Block)) for m in deploy.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in deploy.modules()) == 3
    _assert_equivalent(model, deploy, torch.randn(2, 3, 9, 9))
    assert any(isinstance(m, _Block) for m in model.modules())
    for p, q in zip(model.state_dict().values(), before.state_dict().values()):
        assert torch.equal(p, q)


def test_untraceable_model_names_the_module_and_the_fix():
    class Gate(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x
            return -x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.gate = Gate()

        def forward(self, x):
            return self.gate(self.conv(x))

    with pytest.raises(ValueError, match=r"'gate' \(Gate\).*torch\.fx\.wrap"):
        trace(Net())
    # to_deploy keeps the block opaque instead (issue #26; tests/test_quant_fallback.py)
    with pytest.warns(UserWarning, match=r"gate \(Gate: TraceError: .*control flow"):
        assert list(to_deploy(Net()).opaque_blocks) == ["gate"]
    with pytest.raises(TypeError):
        to_deploy("not a model")


# ----------------------------------------------------------------------------- the registry


@pytest.mark.parametrize("name", models.list_models())
@pytest.mark.parametrize("size,chans,classes", [(32, 3, 100), (8, 1, 10)])
def test_registry_models_deploy_equivalence(name, size, chans, classes):
    model = models.create_model(
        name, num_classes=classes, image_size=size, in_chans=chans, width=0.25, seed=0
    )
    model = _randomise_bn(model)
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every BN must fold: no warning
        deploy = to_deploy(model)
    assert not any(isinstance(m, _BN) for m in deploy.modules())
    assert not any(callable(getattr(m, "reparameterize", None)) for m in deploy.modules())
    assert deploy.num_classes == classes
    assert model.training
    _assert_equivalent(model, deploy, torch.randn(3, chans, size, size))
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mobileone_deployed_size_at_width_1():
    model = _randomise_bn(models.create_model("mobileone_s0", num_classes=100, seed=0))
    deploy = to_deploy(model)
    stats = models.describe(deploy, 32, in_chans=3)
    assert abs(stats.params / 1.16e6 - 1) < 0.02
    assert abs(stats.macs / 85.6e6 - 1) < 0.05
    # one conv per block: no multi-branch modules remain
    assert not any(isinstance(m, _BN) for m in deploy.modules())
    _assert_equivalent(model, deploy, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("name", ["shufflenetv2", "ghostnet_vgg16"])
def test_width_1_models_fold_every_bn(name):
    model = _randomise_bn(models.create_model(name, num_classes=100, seed=0))
    deploy = to_deploy(model)
    assert not any(isinstance(m, _BN) for m in deploy.modules())
    _assert_equivalent(model, deploy, torch.randn(2, 3, 32, 32))


# ----------------------------------------------------------------------------- other libraries'
# re-parameterization: switch_to_deploy, fuse, helpers, and the check that catches a wrong one


class _ConvNorm(nn.Module):
    """LeViT-style conv + BN pair whose ``fuse()`` returns the fused conv."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.c(x))

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        w, b = fold_bn_weights(
            self.c.weight,
            None,
            self.bn.running_mean,
            self.bn.running_var,
            self.bn.eps,
            self.bn.weight,
            self.bn.bias,
        )
        conv = nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1)
        conv.weight.copy_(w)
        conv.bias.copy_(b)
        return conv


class _SwitchBlock(nn.Module):
    """The original RepVGG code's convention: ``switch_to_deploy()`` in place. Its branches are
    ``_ConvNorm`` pairs that have ``fuse()`` themselves: the parent must go first (it reads
    ``.c`` and ``.bn`` of its branches), as in timm's ``reparameterize_model``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = _ConvNorm(c), _ConvNorm(c)
        self.deploy_conv: nn.Module | None = None

    def forward(self, x):
        if self.deploy_conv is not None:
            return torch.relu(self.deploy_conv(x))
        return torch.relu(self.a(x) + self.b(x))

    def switch_to_deploy(self) -> None:
        fa, fb = self.a.fuse(), self.b.fuse()
        conv = nn.Conv2d(fa.in_channels, fa.out_channels, 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(fa.weight + fb.weight)
            conv.bias.copy_(fa.bias + fb.bias)
        self.deploy_conv = conv
        del self.a, self.b


def test_switch_to_deploy_and_fuse_are_applied_parents_first():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _SwitchBlock(4), _ConvNorm(4), nn.Flatten())
    model = _randomise_bn(model).eval()
    x = torch.randn(2, 3, 7, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converted and checked equivalent: nothing to say
        deploy = to_deploy(model, check_input=x)
    assert not any(isinstance(m, (_BN, _SwitchBlock, _ConvNorm)) for m in deploy.modules())
    assert sum(type(m) is nn.Conv2d for m in deploy.modules()) == 3
    _assert_equivalent(model, deploy, torch.randn(2, 3, 7, 7))
    assert deploy.deploy_check["max_abs_diff"] <= 1e-5 * deploy.deploy_check["max_abs_output"]
    assert isinstance(model[1].a, _ConvNorm)  # the input model is untouched


def test_a_reparameterize_model_helper_is_used_instead_of_the_methods():
    """Public MobileOne code ships ``reparameterize_model(model)``: a deep copy with every block
    converted, returned. Such a helper (or one converting in place and returning None) replaces
    the method walk."""
    calls: list[str] = []

    def reparameterize_model(m: nn.Module) -> nn.Module:
        calls.append("helper")
        m = copy.deepcopy(m)
        for name, child in list(m.named_children()):
            if isinstance(child, _SwitchBlock):
                child.switch_to_deploy()
            elif isinstance(child, _ConvNorm):
                setattr(m, name, child.fuse())
        return m

    model = _randomise_bn(nn.Sequential(_SwitchBlock(3), _ConvNorm(3))).eval()
    x = torch.randn(2, 3, 6, 6)
    deploy = to_deploy(model, reparameterize=reparameterize_model, check_input=x)
    assert calls == ["helper"]
    _assert_equivalent(model, deploy, x)
    in_place = to_deploy(model, reparameterize=lambda m: m[0].switch_to_deploy())
    _assert_equivalent(model, in_place, x)
    with pytest.raises(TypeError, match=r"reparameterize\(model\) must return an nn.Module"):
        to_deploy(model, reparameterize=lambda m: "done")


def test_a_wrong_reparameterization_is_caught_by_the_deploy_check():
    class Lossy(_ConvNorm):
        @torch.no_grad()
        def fuse(self) -> nn.Module:
            conv = super().fuse()
            conv.bias.zero_()  # forgets the folded bias: a different function
            return conv

    model = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 1), Lossy(4))).eval()
    x = torch.randn(4, 3, 5, 5)
    with pytest.warns(UserWarning, match=r"does not compute the model's function: on 4 input"):
        deploy = to_deploy(model, check_input=x)
    assert deploy.deploy_check["max_abs_diff"] > 1e-3 * deploy.deploy_check["max_abs_output"]
    with pytest.warns(UserWarning, match="does not compute the model's function"):
        quant.quantize(model, "W8A8", [x])  # quantize checks on its range-calibration images


def test_bn_after_a_conv_whose_shape_is_also_asserted_is_folded():
    """timm's BatchNormAct2d asserts ``x.ndim == 4`` on the conv output: a shape-only reader
    does not stop the fold (the fold changes values, not shapes)."""

    class AssertingBN(nn.BatchNorm2d):
        def forward(self, x):
            torch._assert(x.ndim == 4, "expected 4-D input")
            torch._assert(x.shape[1] == self.num_features, "channels")
            x = nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
            return torch.relu(x)

    model = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), AssertingBN(4))).eval()
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deploy = to_deploy(model, check_input=x)
    assert not any(isinstance(m, _BN) for m in deploy.modules())
    _assert_equivalent(model, deploy, x)
