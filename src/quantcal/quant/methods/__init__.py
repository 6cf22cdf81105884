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

A new method registers with ``@register_method("name", defaults={...}, checks={...})``:
``defaults`` are the options it takes (a value of another type is refused), ``checks`` the
allowed values of each (:func:`integer_option`, :func:`number_option`, or any
``check(value, what) -> value`` raising ValueError). :meth:`QuantMethod.resolve` applies both,
so a study file, ``quant.quantize`` and ``quantcal eval`` refuse a bad value the same way,
before any work.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quantcal._inputs import check_number
from quantcal._registry import Registry, unknown_name_message

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

#: ``check(value, what) -> value``: the value (possibly normalised) if allowed, else a
#: ValueError whose message starts with ``what``.
OptionCheck = Callable[[Any, str], Any]


def integer_option(minimum: int | None = None, maximum: int | None = None) -> OptionCheck:
    """A check that an option is an integer in ``[minimum, maximum]``."""
    return functools.partial(check_number, integer=True, minimum=minimum, maximum=maximum)


def number_option(
    minimum: float | None = None, maximum: float | None = None, *, exclusive_minimum: bool = False
) -> OptionCheck:
    """A check that an option is a finite number in ``[minimum, maximum]`` (``(minimum, ...``
    with ``exclusive_minimum``)."""
    return functools.partial(
        check_number, minimum=minimum, maximum=maximum, exclusive_minimum=exclusive_minimum
    )


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
    #: ``heal(path, reason)`` removes a damaged file of ``work_dir`` and records it (a study's
    #: ``_cache.Cache.heal``); None: ``_cache.heal_work_file`` (recorded in the enclosing run's
    #: ``cache/healed.json`` when there is one, else a warning).
    heal: Callable[[Any, str], None] | None = None


@dataclass(frozen=True)
class QuantMethod:
    """A registered method: its ``name``, function, option ``defaults`` (the options it takes),
    whether it needs training data, and ``checks``: per option, the allowed values
    (:data:`OptionCheck`)."""

    name: str
    fn: Callable[..., dict[str, Any]]
    defaults: dict[str, Any]
    needs_train_data: bool = False
    checks: dict[str, OptionCheck] = field(default_factory=dict)

    def __post_init__(self) -> None:
        stray = sorted(set(self.checks) - set(self.defaults))
        if stray:
            raise ValueError(
                f"method {self.name!r}: checks for options it does not take: {', '.join(stray)}"
            )

    def resolve(
        self, options: dict[str, Any] | None, *, where: str | None = None
    ) -> dict[str, Any]:
        """The defaults updated with ``options``, each value checked: an unknown key is a
        ValueError naming the method's options, a value of another type than its default a
        TypeError, a value outside its check's range a ValueError (``"{where}: option 'lr'
        must be a number > 0, got nan"``). ``where`` says where the options came from (a study
        passes ``quant.method_options.NAME``); default ``method 'NAME'``."""
        prefix = where or f"method {self.name!r}"
        if options is None:
            return dict(self.defaults)
        if not isinstance(options, dict):
            raise TypeError(
                f"{prefix}: the options must be a table (dict), got {type(options).__name__}"
            )
        out = dict(self.defaults)
        for key, value in options.items():
            if key not in self.defaults:
                known = ", ".join(sorted(self.defaults)) or "none"
                raise ValueError(f"{prefix}: no option {key!r}; its options: {known}")
            default = self.defaults[key]
            ok = (
                default is None
                or isinstance(value, type(default))
                or (isinstance(default, float) and isinstance(value, int))
            ) and not (isinstance(value, bool) and not isinstance(default, bool))
            if not ok:
                raise TypeError(
                    f"{prefix}: option {key!r} must be a {type(default).__name__} like its "
                    f"default {default!r}, got {value!r}"
                )
            if key in self.checks:
                value = self.checks[key](value, f"{prefix}: option {key!r}")
            out[key] = float(value) if isinstance(default, float) else value
        return out


METHODS: Registry[QuantMethod] = Registry("quantization method")
_LOADED = False


def register_method(
    name: str,
    *,
    defaults: dict[str, Any] | None = None,
    needs_train_data: bool = False,
    checks: dict[str, OptionCheck] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn(gm, target, ctx) -> {name: QuantizedLayer}`` as ``name``,
    taking the options ``defaults`` with the allowed values ``checks`` (see the module
    docstring)."""

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        METHODS.register(name)(
            QuantMethod(
                name.lower(), fn, dict(defaults or {}), needs_train_data, dict(checks or {})
            )
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
