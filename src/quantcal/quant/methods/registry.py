"""The registry of quantization methods: the ``MethodContext`` a method gets, the
``QuantMethod`` record of a registered method with its option checks (``integer_option``,
``number_option``), and the ``register_method`` decorator.

The built-in methods (``ptq``, ``cle_bc``, ``adaround``, ``qat``) register themselves from here,
not from the package, which loads them on first use (``get_method``, ``available_methods``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quantcal._inputs import check_number
from quantcal._registry import Registry

__all__ = [
    "METHODS",
    "MethodContext",
    "OptionCheck",
    "QuantMethod",
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


def register_method(
    name: str,
    *,
    defaults: dict[str, Any] | None = None,
    needs_train_data: bool = False,
    checks: dict[str, OptionCheck] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn(gm, target, ctx) -> {name: QuantizedLayer}`` as ``name``,
    taking the options ``defaults`` with the allowed values ``checks`` (see the
    ``quant.methods`` package docstring)."""

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        METHODS.register(name)(
            QuantMethod(
                name.lower(), fn, dict(defaults or {}), needs_train_data, dict(checks or {})
            )
        )
        return fn

    return decorator
