"""Quantization methods: named, registered steps from a deploy-form model to a quantized one.

A method is a function ``fn(gm, target, ctx) -> {layer name: QuantizedLayer}``: ``gm`` is a
fresh fp32 deploy graph (``models.to_deploy``; the method may rewrite its fp32 weights, e.g.
cross-layer equalization), ``target`` the ``quant.target.LayerTarget`` (which layers, at which
bits, under which ``QuantConfig``) and ``ctx`` a :class:`MethodContext` (the range-calibration
inputs, the method's options, training data for methods that train, a progress log).
``quant.quantize(model, config, calib, method=NAME)`` runs it and returns an ordinary quantized
model: ``inspect``, logits, every recalibrator and ONNX export work unchanged, because every
method only sets what a ``QuantizedLayer`` stores (integer weights, scales, the integer bias).

Built in (one file each; the papers are cited in each file):

* ``ptq``: min-max post-training quantization, the study's (any range estimator; with
  ``QuantConfig(sequential=True)`` ranges are set in graph order on the quantized network);
* ``cle_bc``: cross-layer equalization with bias absorption, then empirical bias correction
  (Nagel et al., ICCV 2019);
* ``adaround``: learned up/down rounding of the weights, layer by layer (Nagel et al., ICML 2020);
* ``qat``: quantization-aware fine-tuning with learned step sizes (Esser et al., ICLR 2020).

A new method registers with ``@register_method("name", defaults={...}, checks={...})``:
``defaults`` are the options it takes (a value of another type is refused), ``checks`` the
allowed values of each (:func:`integer_option`, :func:`number_option`, or any
``check(value, what) -> value`` raising ValueError). :meth:`QuantMethod.resolve` applies both,
so a study file, ``quant.quantize`` and ``quantcal eval`` refuse a bad value the same way,
before any work.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from quantcal._registry import unknown_name_message
from quantcal.quant.methods.registry import (
    METHODS,
    MethodContext,
    OptionCheck,
    QuantMethod,
    integer_option,
    number_option,
    register_method,
)

__all__ = [
    "MethodContext",
    "OptionCheck",
    "QuantMethod",
    "available_methods",
    "get_method",
    "integer_option",
    "number_option",
    "register_method",
]

_LOADED = False


def _load_builtins() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        from quantcal.quant.methods import adaround, cle_bc, ptq, qat  # noqa: F401


def available_methods() -> list[str]:
    """Names of the registered quantization methods, sorted."""
    _load_builtins()
    return METHODS.available()


def get_method(name: str) -> QuantMethod:
    """The registered method ``name``; an unknown name is a ValueError listing the valid ones."""
    _load_builtins()
    if not isinstance(name, str) or name.lower() not in METHODS:
        raise ValueError(
            unknown_name_message("quantization method", str(name), METHODS.available())
        )
    return METHODS.get(name)


def with_options(method: QuantMethod, **options: Any) -> QuantMethod:
    """A copy of ``method`` with other defaults (tests, presets)."""
    return dataclasses.replace(method, defaults={**method.defaults, **options})
