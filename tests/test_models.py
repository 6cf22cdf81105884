"""Tests of the model zoo (quantcal.models): every registered family, at tiny widths unless a
test checks the published sizes (those build width 1.0 and run one forward)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.fx
from torch import nn

from quantcal import models
from quantcal.models._common import channel_shuffle, downsample_strides
from quantcal.models.ghostnet import vgg_pool_plan
from quantcal.models.mobileone import MobileOneBlock

NAMES = models.list_models()
TINY = 0.1
SHAPES = [(32, 100, 3), (28, 9, 3), (8, 10, 1)]  # (image_size, num_classes, in_chans)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny nets gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP
    spin-waits made a 0.1 s forward take seconds; run these tests single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(name: str, image_size: int = 32, num_classes: int = 10, in_chans: int = 3, **kw):
    return models.create_model(
        name, num_classes=num_classes, image_size=image_size, in_chans=in_chans, width=TINY, **kw
    )


def test_registry_lists_the_study_families():
    assert {"shufflenetv2", "augshufflenet", "ghostnet_vgg16", "mobileone_s0"} <= set(NAMES)
    assert sorted(NAMES) == NAMES


# ---------------------------------------------------------------- shapes, grads, tracing, seeds
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("size", "classes", "chans"), SHAPES)
def test_forward_shape_and_final_map(name, size, classes, chans):
    model = tiny(name, size, classes, chans)
    x = torch.randn(2, chans, size, size)
    assert model(x).shape == (2, classes)
    fmap = model.features(x)
    # Never 0x0; 1x1 only where the reference form itself ends in 1x1 (Ghost-VGG's 5th pool).
    side = fmap.shape[-1]
    # ResNet-20 (He et al. 2016, §4.2) and the ablation skeleton built like it: two stride-2
    # stages, so the reference 32x32 form ends in 8x8
    if name.startswith("ablation_") or name == "resnet20":
        assert side == {32: 8, 28: 7, 8: 4}[size]
    else:
        assert side == (1 if name == "ghostnet_vgg16" else 4)
    assert fmap.shape[-2] == side


@pytest.mark.parametrize("name", NAMES)
def test_rebuild_attributes_and_config_roundtrip(name):
    model = tiny(name, 28, 9, 1, seed=3)
    assert (model.num_classes, model.image_size, model.in_chans, model.width) == (9, 28, 1, TINY)
    assert model.config["name"] == name and model.config["seed"] == 3
    config = dict(model.config)
    rebuilt = models.create_model(config.pop("name"), **config)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name):
    model = tiny(name, 8, 10, 1)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fx_trace_matches_eager(name, mode):
    model = tiny(name, 8, 5, 1)
    model.train(mode == "train")
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(traced(x), model(x))
    # the channel check survives tracing as one opaque call
    with pytest.raises(ValueError, match="expected 1-channel input"):
        traced(torch.randn(3, 3, 8, 8))


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_seed(name):
    a, b, c = (tiny(name, 8, 4, 1, seed=s) for s in (7, 7, 8))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert any(not torch.equal(va, vc) for va, vc in zip(a.parameters(), c.parameters()))
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_he_initialisation(name):
    model = tiny(name, 8, 10, 1, seed=0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    big = max(convs, key=lambda m: m.weight.numel())
    fan_out = big.out_channels * big.kernel_size[0] * big.kernel_size[1] // big.groups
    assert big.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.2)
    # Zero-init residual (Goyal et al. 2017): the branch BNs of MobileOne blocks with a BN skip
    # start at gamma 0 (not RepVGG units that opt out: ablation_reparam keeps the base's init);
    # every other BN at gamma 1, all biases 0.
    zeroed = set()
    for m in model.modules():
        if getattr(m, "identity", None) is not None and getattr(m, "zero_init_branches", True):
            zeroed |= {id(b) for b in m.modules() if isinstance(b, nn.BatchNorm2d)}
            zeroed.discard(id(m.identity))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            gamma = 0.0 if id(m) in zeroed else 1.0
            assert torch.equal(m.weight, torch.full_like(m.weight, gamma))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
        if isinstance(m, nn.Linear):
            assert m.weight.std().item() == pytest.approx(0.01, rel=0.3)


@pytest.mark.parametrize("name", NAMES)
def test_conv_inputs_are_contiguous(name):
    """Chunks and shuffles must not reach a conv as strided views (pytorch #75009).

    Watches ``F.conv2d`` itself (a TorchFunctionMode), so convs that a module runs
    functionally (MobileOne's fused train/eval form) are checked as well as nn.Conv2d layers.
    """
    seen = []

    class WatchConvs(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is nn.functional.conv2d:
                seen.append(args[0].is_contiguous())
            return func(*args, **(kwargs or {}))

    model = tiny(name, 8, 4, 1)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        with WatchConvs():
            model(torch.randn(2, 1, 8, 8))
    assert seen and all(seen)


def test_channel_shuffle_matches_index_permutation():
    x = torch.randn(2, 6, 3, 3)
    out = channel_shuffle(x, 2)
    # groups (0,1,2) and (3,4,5) interleave: 0,3,1,4,2,5
    torch.testing.assert_close(out, x[:, [0, 3, 1, 4, 2, 5]])
    assert out.is_contiguous()


def test_augshuffle_unit_matches_functional_rederivation():
    """Crossover wiring re-derived with F.conv2d/F.batch_norm and explicit index shuffling."""
    from quantcal.models.shufflenet import AugShuffleUnit

    F = nn.functional
    unit = AugShuffleUnit(16, ratio=0.375)  # 6 convolved channels (16 * 0.375), 10 untouched
    _randomise_bn(unit, torch.Generator().manual_seed(2))
    unit.eval()
    x = torch.randn(2, 16, 5, 5)

    def cbn(seq, t, groups=1, pad=0):
        conv, bn = seq[0], seq[1]
        t = F.conv2d(t, conv.weight, None, 1, pad, 1, groups)
        return F.batch_norm(
            t, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0, bn.eps
        )

    keep, conv = x[:, :10], x[:, 10:]
    y = cbn(unit.branch[1], cbn(unit.branch[0], conv), groups=6, pad=1)  # no ReLU in between
    passed = torch.cat((y[:, :3], keep[:, :5]), 1)
    mixed = F.relu(cbn(unit.fuse, torch.cat((keep[:, 5:], y[:, 3:]), 1)))
    both = torch.cat((passed, mixed), 1)
    want = both[:, [i // 2 + 8 * (i % 2) for i in range(16)]]  # shuffle: 0, 8, 1, 9, ...
    with torch.no_grad():
        torch.testing.assert_close(unit(x), want)


# ---------------------------------------------------------------- size adaptation rules
@pytest.mark.parametrize("size", range(4, 65))
def test_downsample_rule_keeps_reference_final_map(size):
    strides = downsample_strides(size, 3, min_final=4)
    side = size
    for s in strides:
        side = math.ceil(side / s)
    assert side >= 4
    if size >= 25:  # big enough for all three stride-2 stages, as in the 32x32 form
        assert strides == (2, 2, 2)
    else:  # one more stride-2 stage would leave less than 4x4
        assert math.ceil(side / 2) < 4
        assert list(strides) == sorted(strides)  # the earliest stages are the stride-1 ones


@pytest.mark.parametrize("size", range(4, 65))
def test_vgg_pool_plan_never_runs_convs_at_1x1(size):
    plan = vgg_pool_plan(size)
    side, sides = size, []
    for keep in plan:  # VGG-16: conv stage, pool, conv stage, pool, ... (5 stages, 5 pools)
        sides.append(side)
        side = math.ceil(side / 2) if keep else side
    assert min(sides) >= 2 and side >= 1
    if size in (28, 32):
        assert all(plan) and side == 1


# ---------------------------------------------------------------- published sizes (width 1.0)
REFERENCE_SIZES = {  # name: (params M, MACs M), 100 classes, 32x32 (REFERENCE.md §2)
    "shufflenetv2": (1.36, 45.1),
    "augshufflenet": (1.30, 43.6),
    "ghostnet_vgg16": (7.43, 158.0),
    # 85.6 M MACs is the deployed figure; in eval mode the train-time form runs one fused conv
    # per block, so it costs exactly that too (test_mobileone_eval_macs_equal_deployed).
    "mobileone_s0": (4.37, 85.6),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_SIZES))
def test_params_and_macs_match_reference(name):
    ref_params, ref_macs = REFERENCE_SIZES[name]
    stats = models.describe(models.create_model(name, num_classes=100))
    assert stats.mparams == pytest.approx(ref_params, rel=0.02)
    assert stats.mmacs == pytest.approx(ref_macs, rel=0.05)


def test_shufflenetv2_28x28_size():
    stats = models.describe(models.create_model("shufflenetv2", num_classes=9, image_size=28))
    assert stats.mparams == pytest.approx(1.26, rel=0.02)
    assert stats.mmacs == pytest.approx(37.9, rel=0.05)


@pytest.mark.parametrize(
    ("width", "imagenet_params"),
    # torchvision shufflenet_v2_x{0_5,1_0,1_5,2_0}: the CIFAR stem drops only the max-pool and a
    # stride, so at 1000 classes the parameter counts must agree exactly.
    [(0.5, 1_366_792), (1.0, 2_278_604), (1.5, 3_503_624), (2.0, 7_393_996)],
)
def test_shufflenetv2_widths_match_torchvision_counts(width, imagenet_params):
    model = models.create_model("shufflenetv2", num_classes=1000, width=width)
    assert sum(p.numel() for p in model.parameters()) == imagenet_params


def test_interpolated_widths_round_to_even():
    model = models.create_model("shufflenetv2", num_classes=10, width=0.25, head_channels=64)
    # 116*0.25 = 29 = 2*14.5 -> 2*14 (Python rounds ties to even), 232*0.25 = 58, 464*0.25 = 116
    assert model.stage_channels == (28, 58, 116)
    assert model.config["head_channels"] == 64
    aug = models.create_model("augshufflenet", num_classes=10, width=0.1)
    assert aug.stage_channels == (12, 24, 48)
    assert all(c % 2 == 0 for c in aug.stage_channels)


# ---------------------------------------------------------------- MobileOne reparameterization
def _randomise_bn(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
                m.weight.copy_(torch.randn(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)


BLOCK_CASES = [  # in, out, kernel, stride, groups, branches
    (6, 6, 3, 1, 6, 4),  # depthwise with identity and scale branches
    (6, 6, 3, 2, 6, 4),  # depthwise stride 2: no identity
    (6, 10, 1, 1, 1, 4),  # pointwise, widening: no identity, no scale branch
    (8, 8, 1, 1, 1, 4),  # pointwise with identity
    (8, 8, 3, 1, 2, 3),  # grouped conv (2 groups of 4): group-aware identity kernel
    (3, 12, 3, 1, 1, 1),  # the stem: one conv branch + scale branch
]


@pytest.mark.parametrize(("cin", "cout", "k", "stride", "groups", "branches"), BLOCK_CASES)
def test_mobileone_block_reparameterize_is_equivalent(cin, cout, k, stride, groups, branches):
    gen = torch.Generator().manual_seed(0)
    block = MobileOneBlock(cin, cout, k, stride, groups, branches)
    _randomise_bn(block, gen)
    block.eval()
    before = copy.deepcopy(block.state_dict())
    fused = block.reparameterize()
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].bias is not None and convs[0].groups == groups
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert not fused.training
    x = torch.randn(2, cin, 9, 9, generator=gen)
    with torch.no_grad():
        want, got = block(x), fused(x)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-5 * scale
    # self is unchanged and shares no storage with the new module
    after = block.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert all(p.data_ptr() != q.data_ptr() for p in fused.parameters() for q in block.parameters())
    assert block.conv_kxk is not None and len(block.conv_kxk) == branches


def test_mobileone_block_reference_kernel_by_hand():
    """Independent re-derivation for a 1-channel depthwise block: explicit kernel arithmetic."""
    block = MobileOneBlock(1, 1, 3, 1, 1, num_branches=1)
    with torch.no_grad():
        w3 = torch.arange(9.0).reshape(1, 1, 3, 3)
        block.conv_kxk[0][0].weight.copy_(w3)
        block.conv_scale[0].weight.fill_(2.0)
        for bn, (g, b, mu, var) in zip(
            (block.conv_kxk[0][1], block.conv_scale[1], block.identity),
            ((2.0, 1.0, 0.5, 3.0), (0.5, -1.0, 1.0, 1.0), (3.0, 0.25, -1.0, 0.5)),
        ):
            bn.weight.fill_(g)
            bn.bias.fill_(b)
            bn.running_mean.fill_(mu)
            bn.running_var.fill_(var)
    eps = block.identity.eps
    t1, t2, t3 = (
        2.0 / math.sqrt(3.0 + eps),
        0.5 / math.sqrt(1.0 + eps),
        3.0 / math.sqrt(0.5 + eps),
    )
    want_kernel = w3 * t1
    want_kernel[0, 0, 1, 1] += 2.0 * t2 + 1.0 * t3
    want_bias = (1.0 - 0.5 * t1) + (-1.0 - 1.0 * t2) + (0.25 + 1.0 * t3)
    conv = block.reparameterize()[0]
    torch.testing.assert_close(conv.weight, want_kernel)
    torch.testing.assert_close(conv.bias, torch.tensor([want_bias]))


def test_mobileone_whole_model_reparameterized_sizes():
    """Swapping every block for its reparameterized form gives the deployed S0 (1.16 M params,
    85.6 M MACs) with the same eval-mode logits."""
    model = models.create_model("mobileone_s0", num_classes=100)
    _randomise_bn(model, torch.Generator().manual_seed(1))
    model.eval()
    deployed = copy.deepcopy(model)

    def swap(parent: nn.Module) -> None:
        for child_name, child in parent.named_children():
            if isinstance(child, MobileOneBlock):
                setattr(parent, child_name, child.reparameterize())
            else:
                swap(child)

    swap(deployed)
    stats = models.describe(deployed)
    assert stats.mparams == pytest.approx(1.16, rel=0.02)
    assert stats.mmacs == pytest.approx(85.6, rel=0.05)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, got = model(x), deployed(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


# ---------------------------------------------------------------- MobileOne fused forward
def _separate_branches_reference(
    block: MobileOneBlock, x: torch.Tensor, bufs: dict
) -> torch.Tensor:
    """Independent re-derivation: every branch as its own F.conv2d + F.batch_norm (train mode
    updates the cloned running statistics in ``bufs``), summed, then ReLU."""
    F = nn.functional
    training = block.training
    pad = block.kernel_size // 2

    def cbn(conv_weight, bn, name, padding):
        t = F.conv2d(x, conv_weight, None, block.stride, padding, 1, block.groups)
        return bn_only(t, bn, name)

    def bn_only(t, bn, name):
        mean, var = bufs[name]
        return F.batch_norm(t, mean, var, bn.weight, bn.bias, training, bn.momentum, bn.eps)

    out = 0
    for i, branch in enumerate(block.conv_kxk):
        out = out + cbn(branch[0].weight, branch[1], f"kxk{i}", pad)
    if block.conv_scale is not None:
        out = out + cbn(block.conv_scale[0].weight, block.conv_scale[1], "scale", 0)
    if block.identity is not None:
        out = out + bn_only(x, block.identity, "identity")
    return F.relu(out)


def _cloned_buffers(block: MobileOneBlock) -> dict:
    bns = {f"kxk{i}": b[1] for i, b in enumerate(block.conv_kxk)}
    if block.conv_scale is not None:
        bns["scale"] = block.conv_scale[1]
    if block.identity is not None:
        bns["identity"] = block.identity
    return {k: (bn.running_mean.clone(), bn.running_var.clone()) for k, bn in bns.items()}


FUSED_CASES = [  # in, out, kernel, stride, groups, branches, map side: which moments path
    (6, 6, 3, 1, 6, 4, 8),  # depthwise, 64 pixels: Gram path, identity + scale branches
    (6, 6, 3, 2, 6, 4, 7),  # depthwise stride 2 on an odd map: Gram path, no identity
    (6, 6, 3, 1, 6, 4, 9),  # depthwise, 81 pixels: statistics from the branch outputs
    (6, 10, 1, 1, 1, 4, 5),  # pointwise widening: channel-covariance path
    (8, 8, 1, 1, 1, 4, 4),  # pointwise with identity
    (8, 8, 1, 1, 2, 3, 4),  # grouped pointwise: per-group covariance blocks
    (8, 8, 3, 1, 2, 3, 6),  # grouped 3x3: branch outputs
    (3, 12, 3, 1, 1, 1, 8),  # RGB stem: branch outputs
    (1, 12, 3, 1, 1, 1, 8),  # grey-scale stem: Gram path with one channel
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("cin", "cout", "k", "stride", "groups", "branches", "side"), FUSED_CASES)
def test_mobileone_fused_block_equals_separate_branches(
    cin, cout, k, stride, groups, branches, side, dtype
):
    """The fused forward (one conv whose kernel folds every branch's BN) is the sum of the
    separate conv+BN branches: train-mode output, gradients and running statistics, then
    eval-mode output, against F.conv2d + F.batch_norm on the same weights."""
    gen = torch.Generator().manual_seed(3)
    block = MobileOneBlock(cin, cout, k, stride, groups, branches).to(dtype)
    _randomise_bn(block, gen)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 4:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
    ref_block = copy.deepcopy(block)
    x = torch.randn(5, cin, side, side, generator=gen, dtype=dtype).relu() + 0.3
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-4}

    for step in range(2):  # twice: the running statistics compound
        block.train()
        bufs = _cloned_buffers(ref_block)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = block(xa)
        want = _separate_branches_reference(ref_block, xb, bufs)
        torch.testing.assert_close(got, want, **tol)
        weights = torch.randn(got.shape, generator=gen, dtype=dtype)
        (got * weights).sum().backward()
        (want * weights).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, **tol)
        for (name, p), q in zip(block.named_parameters(), ref_block.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **tol, msg=name)
        for name, (mean, var) in bufs.items():  # F.batch_norm updated the reference clones
            bn = dict(_named_bns(block))[name]
            torch.testing.assert_close(bn.running_mean, mean, **tol)
            torch.testing.assert_close(bn.running_var, var, **tol)
            assert int(bn.num_batches_tracked) == step + 1
            ref_bn = dict(_named_bns(ref_block))[name]
            ref_bn.running_mean.copy_(mean)
            ref_bn.running_var.copy_(var)
        block.zero_grad()
        ref_block.zero_grad()

    block.eval()
    ref_block.eval()
    with torch.no_grad():
        got = block(x)
        want = _separate_branches_reference(ref_block, x, _cloned_buffers(ref_block))
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(block.forward_branches(x), want, **tol)
        torch.testing.assert_close(block.reparameterize()(x), want, **tol)


def _named_bns(block: MobileOneBlock):
    for i, branch in enumerate(block.conv_kxk):
        yield f"kxk{i}", branch[1]
    if block.conv_scale is not None:
        yield "scale", block.conv_scale[1]
    if block.identity is not None:
        yield "identity", block.identity


@pytest.mark.parametrize("fuse_train", [True, False])
def test_mobileone_block_train_mode_needs_two_values_per_channel(fuse_train):
    block = MobileOneBlock(4, 4, 1, num_branches=2, fuse_train=fuse_train)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        block(torch.randn(1, 4, 1, 1))
    block.eval()
    assert block(torch.randn(1, 4, 1, 1)).shape == (1, 4, 1, 1)


def test_mobileone_fused_model_step_equals_separate_branch_model():
    """A whole tiny S0 (8x8: every moments path) trained one SGD step with the fused blocks and
    with every block's straightforward forward ends with the same weights and statistics."""
    model = models.create_model(
        "mobileone_s0", num_classes=10, image_size=8, in_chans=1, width=TINY, seed=0
    ).double()
    peer = copy.deepcopy(model)
    for m in peer.modules():
        if isinstance(m, MobileOneBlock):
            m.fuse_train = False  # forward_branches in train mode
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=gen)
    for net in (model, peer):
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    for (name, a), b in zip(model.state_dict().items(), peer.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


def test_mobileone_block_init_weights_zeroes_branch_gammas_of_skip_blocks():
    gen = torch.Generator().manual_seed(4)
    skip = MobileOneBlock(6, 6, 3, 1, 6, 4)
    _randomise_bn(skip, gen)
    with torch.no_grad():  # the generic init leaves every BN bias at 0
        for bn in skip.branch_norms():
            bn.bias.zero_()
    skip.init_weights()
    for branch in skip.conv_kxk:
        assert torch.equal(branch[1].weight, torch.zeros(6))
    assert torch.equal(skip.conv_scale[1].weight, torch.zeros(6))
    assert not torch.equal(skip.identity.weight, torch.zeros(6))
    x = torch.randn(4, 6, 5, 5, generator=gen)
    for mode in (True, False):  # the block starts as ReLU(BN_skip(x))
        skip.train(mode)
        ref = copy.deepcopy(skip.identity)
        torch.testing.assert_close(skip(x), torch.relu(ref(x)), rtol=1e-5, atol=1e-5)
    no_skip = MobileOneBlock(6, 10, 1, 1, 1, 4)  # no skip: zero gammas would kill the block
    before = copy.deepcopy(no_skip.state_dict())
    no_skip.init_weights()
    assert all(torch.equal(before[k], v) for k, v in no_skip.state_dict().items())


def test_mobileone_eval_macs_equal_deployed():
    model = models.create_model("mobileone_s0", num_classes=10, image_size=8, in_chans=1)
    assert models.describe(model).macs == models.describe(models.to_deploy(model)).macs


# ---------------------------------------------------------------- describe
def test_describe_counts_by_hand():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    model.train()
    stats = models.describe(model, 8, in_chans=3, weight_bits=4)
    assert model.training  # mode restored
    assert stats.params == 108 + 8 + 8 + 2
    assert stats.macs == 4 * 3 * 9 * 8 * 8 + 4 * 2  # conv + linear multiply-accumulates
    # conv weight 108 x 4 bit = 54 B + 4 scales; linear 8 x 4 bit = 4 B + 2 scales;
    # BN affine 8 and linear bias 2 at fp32.
    assert stats.weight_bytes == (54 + 4 * 4) + (4 + 2 * 4) + (8 + 2) * 4
    assert stats.quantized_params == 116
    fp32 = models.describe(model, 8, in_chans=3)
    assert fp32.weight_bytes == 4 * stats.params
    odd = models.describe(nn.Conv2d(3, 1, 1), 1, in_chans=3, weight_bits=3)
    assert odd.weight_bytes == 2 + 4 + 4  # 9 packed bits round up to 2 bytes, + scale + bias
    assert odd.macs == 3


@pytest.mark.parametrize("name", NAMES)
def test_describe_defaults_to_model_attributes(name):
    model = tiny(name, 8, 10, 1)
    stats = models.describe(model, weight_bits=8)
    assert (stats.image_size, stats.in_chans, stats.weight_bits) == (8, 1, 8)
    assert stats.params == sum(p.numel() for p in model.parameters())
    assert 0 < stats.weight_bytes < 4 * stats.params
    assert stats.as_dict()["macs"] == stats.macs > 0


def test_describe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="weight_bits"):
        models.describe(tiny("ghostnet_vgg16", 8), weight_bits=0)
    with pytest.raises(ValueError, match="image_size"):
        models.describe(nn.Linear(2, 2))


# ---------------------------------------------------------------- errors
def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="shufflenetv2") as info:
        models.create_model("shufflenet_v2", num_classes=10)
    for name in NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 10, "in_chans": 0}, "in_chans"),
        ({"num_classes": 10, "width": 0.0}, "width"),
        ({"num_classes": 10, "width": -1.0}, "width"),
        ({"num_classes": 10, "width": float("nan")}, "width"),
        ({"num_classes": 10, "image_size": 3}, "image_size"),
    ],
)
@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_raise_value_error(name, kwargs, field):
    with pytest.raises(ValueError, match=field):
        models.create_model(name, **kwargs)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="num_classes"):
        models.create_model("shufflenetv2", num_classes=10.0)
    with pytest.raises(TypeError, match="seed"):
        models.create_model("shufflenetv2", num_classes=10, seed="0")
    with pytest.raises(TypeError):
        models.create_model("shufflenetv2", num_classes=10, no_such_option=1)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_channel_count_at_forward(name):
    model = tiny(name, 8, 10, 3)
    with pytest.raises(ValueError, match=r"expected 3-channel input of shape \(B, C, H, W\)"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="expected 3-channel"):
        model(torch.randn(3, 8, 8))


def test_family_options_are_validated():
    with pytest.raises(ValueError, match="ratio"):
        models.create_model("augshufflenet", num_classes=10, ratio=0.9)
    with pytest.raises(ValueError, match="head_channels"):
        models.create_model("shufflenetv2", num_classes=10, head_channels=0)
    with pytest.raises(ValueError, match="num_branches"):
        models.create_model("mobileone_s0", num_classes=10, num_branches=0)


def test_unknown_attribute_of_models_package():
    with pytest.raises(AttributeError, match="no_such_thing"):
        models.no_such_thing
