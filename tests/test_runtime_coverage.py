""" "k of n quantized" is true whatever fx sees (issue #26, item 1): a conv, linear or matrix
product inside a function fx does not trace (``torch.fx.wrap``) is found at run time and named,
counted in ``quant_coverage``, and refused with ``on_unsupported="error"``."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantcal import models, quant
from quantcal.quant.runtime_count import COUNTED_OPS, hidden_computations


@torch.fx.wrap
def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The helper quantcal's old trace-error advice led to: a weight used inside fx.wrap."""
    return F.linear(x, weight, bias)


class WrappedHelper(nn.Module):
    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1)
        x = project(x, self.proj.weight, self.proj.bias)
        return self.head(torch.relu(x))


class VisibleProduct(nn.Module):
    """A product of two activations in the traced graph itself: the static count names it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(36, 4)

    def forward(self, x):
        t = self.conv(x).flatten(2)  # (B, 8, 36)
        g = torch.matmul(t.transpose(1, 2), t)  # (B, 36, 36)
        return self.head(g.mean(1))


class Attention(nn.Module):
    """nn.MultiheadAttention, a leaf module the static count names once."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)
        t = self.attn(t, t, t, need_weights=False)[0]
        return self.head(t.mean(1))


def _quantize(model: nn.Module, **cfg):
    torch.manual_seed(0)
    deploy = models.to_deploy(model.eval())
    config = quant.parse_precision("W8A8")
    if cfg:
        import dataclasses

        config = dataclasses.replace(config, **cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quant.quantize(deploy, config, [torch.randn(6, 1, 6, 6)])
    return q, [str(w.message) for w in caught]


def test_a_weight_used_inside_an_fx_wrapped_helper_is_named_and_counted():
    q, said = _quantize(WrappedHelper())
    cov = q.quant_coverage
    assert cov["quantized"] == 2 and cov["total"] == 3  # conv and head; the helper's linear not
    (entry,) = [e for e in cov["fp32"] if e.startswith("project")]
    assert "linear call at test_runtime_coverage.py:" in entry and "1 at run time" in entry
    assert any("2 of 3 conv/linear computations quantized" in m and "project" in m for m in said)


def test_on_unsupported_error_refuses_what_runs_in_fp32_inside_a_wrapped_helper():
    with pytest.raises(ValueError, match=r"project \(linear call.*on_unsupported='warn'"):
        _quantize(WrappedHelper(), on_unsupported="error")


def test_what_the_graph_shows_is_not_counted_twice():
    # products of two activations left in fp32 (quantize_matmuls=False), so they are named
    q, _ = _quantize(VisibleProduct(), quantize_matmuls=False)
    assert q.quant_coverage["total"] == 3 and len(q.quant_coverage["fp32"]) == 1
    assert "torch.matmul call" in q.quant_coverage["fp32"][0]
    q, _ = _quantize(Attention(), quantize_matmuls=False)
    left = q.quant_coverage["fp32"]
    assert len(left) == 1 and "MultiheadAttention" in left[0], left  # its inner products: once


def test_a_fully_quantized_model_runs_nothing_in_fp32():
    net = models.create_model("resnet20", num_classes=4, image_size=6, in_chans=1, width=0.25)
    q, said = _quantize(net)
    assert q.quant_coverage["quantized"] == q.quant_coverage["total"] == 20
    assert not [m for m in said if "found at run time" in m]
    assert hidden_computations(q, torch.randn(2, 1, 6, 6)) == []


def test_a_helper_called_by_several_blocks_counts_each_computation():
    class Twice(WrappedHelper):
        def forward(self, x):
            x = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1)
            x = project(x, self.proj.weight, self.proj.bias)
            x = project(torch.relu(x), self.proj.weight, self.proj.bias)
            return self.head(x)

    q, said = _quantize(Twice())
    assert q.quant_coverage["quantized"] == 2 and q.quant_coverage["total"] == 4
    (entry,) = [e for e in q.quant_coverage["fp32"] if e.startswith("project")]
    assert "2 at run time" in entry
    assert any("2 of 4 conv/linear computations" in m for m in said)


def test_the_run_time_check_leaves_the_calibration_batch_as_it_was():
    x = torch.randn(6, 1, 6, 6)
    before = x.clone()
    deploy = models.to_deploy(WrappedHelper().eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant.quantize(deploy, quant.parse_precision("W4A4"), [x])
    assert torch.equal(x, before)


def test_every_counted_op_is_a_torch_function_name():
    import torch.nn.functional as functional

    for name in COUNTED_OPS - {"__matmul__", "__rmatmul__"}:
        assert hasattr(torch, name) or hasattr(functional, name), name
