"""The model zoo: the study's efficient CNNs adapted to small images (REFERENCE.md §2).

``create_model(name, *, num_classes, image_size=32, in_chans=3, width=1.0, seed=None, **kw)``
builds any name of ``list_models()``: the study's "shufflenetv2", "augshufflenet",
"ghostnet_vgg16" and "mobileone_s0"; "resnet20", "mobilenetv2", "mobilenetv3_small",
"efficientnet_b0" and "repvgg_a0" in their CIFAR form (:mod:`quantcal.models.resnet`,
:mod:`~quantcal.models.mobilenet`, :mod:`~quantcal.models.efficientnet`,
:mod:`~quantcal.models.repvgg`); or the controlled ablation family "ablation_base",
"ablation_separable", "ablation_no_residual", "ablation_relu6", "ablation_hardswish",
"ablation_se", "ablation_reparam", "ablation_attention" (a ResNet-20-like skeleton changing one
property at a time at a matched deploy budget; :mod:`quantcal.models.ablation`); or the hybrid
convolution + self-attention families "mobilevit_xxs" and "efficientformer_l1" in their CIFAR
form (:mod:`quantcal.models.hybrid`). ``describe(model)`` (in
:mod:`quantcal.models.stats`) gives parameters, MACs and weight bytes; ``to_deploy(model)`` (in
:mod:`quantcal.models.deploy`; both loaded on first use) gives the
reparameterized, BN-folded eval-mode copy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Importing the family modules registers them; they only define classes.
from quantcal.models import (  # noqa: F401
    ablation,
    efficientnet,
    ghostnet,
    hybrid,
    mobilenet,
    mobileone,
    repvgg,
    resnet,
    shufflenet,
)
from quantcal.models.registry import create_model, list_models, register_model

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from quantcal.models.deploy import to_deploy
    from quantcal.models.stats import ModelStats, describe

#: Names loaded from their module on first use: the deploy graph and the cost statistics read
#: quantization settings (``quant``), which itself imports this package.
_LAZY = {
    "to_deploy": "quantcal.models.deploy",
    "describe": "quantcal.models.stats",
    "ModelStats": "quantcal.models.stats",
}

__all__ = ["ModelStats", "create_model", "describe", "list_models", "register_model", "to_deploy"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quantcal.models' has no attribute {name!r}")
