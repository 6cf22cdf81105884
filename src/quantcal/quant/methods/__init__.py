"""Quantization methods: named, registered steps from a deploy-form model to a quantized one.

A method is a function ``fn(gm, target, ctx) -> {layer name: QuantizedLayer}``: ``gm`` is a
fresh fp32 deploy graph (``models.to_deploy``; the method may rewrite its fp32 weights, e.g.
cross-layer equalization), ``target`` the ``quant.apply.LayerTarget`` (which layers, at which
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

A new method registers with ``@register_method("name", defaults={...})``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quantcal._registry import Registry, unknown_name_message

__all__ = [
    "MethodContext",
    "QuantMethod",
    "available_methods",
    "get_method",
    "register_method",
]


@dataclass(frozen=True)
class MethodContext:
    """What a method gets besides the graph: ``calib`` (the range-calibration input tensors,
    as batches), ``options`` (the method's options, defaults filled in), ``train_data``
    (``data.Splits`` / ``data.Split`` for methods that train, else None) and ``log``."""

    calib: list[Any]
    options: dict[str, Any] = field(default_factory=dict)
    train_data: Any = None
    log: Callable[[str], None] = print
    #: The training recipe a training method starts from (``train.TrainConfig``; None: the
    #: method's own default), a folder for its resumable checkpoints, and whether to show a
    #: progress bar.
    train_config: Any = None
    work_dir: Any = None
    progress: bool = False


@dataclass(frozen=True)
class QuantMethod:
    """A registered method: its ``name``, function, option ``defaults`` (the options it takes)
    and whether it needs training data."""

    name: str
    fn: Callable[..., dict[str, Any]]
    defaults: dict[str, Any]
    needs_train_data: bool = False

    def resolve(self, options: dict[str, Any] | None) -> dict[str, Any]:
        """The defaults updated with ``options``; an unknown key is a ValueError naming the
        method's options, a value of another type than its default a TypeError."""
        if options is None:
            return dict(self.defaults)
        if not isinstance(options, dict):
            raise TypeError(
                f"options of method {self.name!r} must be a dict, got {type(options).__name__}"
            )
        out = dict(self.defaults)
        for key, value in options.items():
            if key not in self.defaults:
                known = ", ".join(sorted(self.defaults)) or "none"
                raise ValueError(
                    f"method {self.name!r} has no option {key!r}; its options: {known}"
                )
            default = self.defaults[key]
            ok = (
                default is None
                or isinstance(value, type(default))
                or (isinstance(default, float) and isinstance(value, int))
            ) and not (isinstance(value, bool) and not isinstance(default, bool))
            if not ok:
                raise TypeError(
                    f"option {key!r} of method {self.name!r} must be a "
                    f"{type(default).__name__} like its default {default!r}, got {value!r}"
                )
            out[key] = float(value) if isinstance(default, float) else value
        return out


METHODS: Registry[QuantMethod] = Registry("quantization method")
_LOADED = False


def register_method(
    name: str, *, defaults: dict[str, Any] | None = None, needs_train_data: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn(gm, target, ctx) -> {name: QuantizedLayer}`` as ``name``."""

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        METHODS.register(name)(
            QuantMethod(name.lower(), fn, dict(defaults or {}), needs_train_data)
        )
        return fn

    return decorator


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
