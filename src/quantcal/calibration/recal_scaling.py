"""The logit maps: no recalibration (:class:`Identity`), temperature scaling (the exact
NLL-optimal ``T`` by safeguarded Newton) and vector and matrix scaling (L-BFGS with a ridge
towards the identity). Guo et al. 2017 "On Calibration of Modern Neural Networks".
"""

from __future__ import annotations

import abc
import math
import warnings
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from quantcal.calibration.checks import ArrayLike
from quantcal.calibration.recal_base import (
    Base,
    apply_input,
    check_state,
    fit_inputs,
    output,
    register,
)

__all__ = [
    "T_MAX",
    "T_MIN",
    "Identity",
    "MatrixScaling",
    "TemperatureScaling",
    "VectorScaling",
]

T_MIN, T_MAX = 1e-2, 1e2  # temperature search interval; a fit at either end warns

R = TypeVar("R", bound="Base")


# ----------------------------------------------------------------------------------------------
# identity
# ----------------------------------------------------------------------------------------------
@register("none")
class Identity(Base):
    """No recalibration: returns the logits unchanged (lets studies list "none" uniformly)."""

    name: ClassVar[str] = "none"
    preserves_argmax: ClassVar[bool] = True

    @classmethod
    def fit_parameters(cls, n_classes: int | None = None) -> int | None:
        return 0

    def __init__(self) -> None:
        self._fitted = False

    @property
    def fitted(self) -> bool:
        return self._fitted

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> Identity:
        fit_inputs(logits, labels)
        self._fitted = True
        return self

    def __call__(self, logits: ArrayLike) -> ArrayLike:
        z = apply_input(logits)
        self._require_fitted(z)
        return output(z.clone(), logits, z)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "fitted": self._fitted}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Identity:
        check_state(cls, state)
        out = cls()
        out._fitted = bool(state["fitted"])
        return out


# ----------------------------------------------------------------------------------------------
# temperature scaling
# ----------------------------------------------------------------------------------------------
def _ts_terms(
    zc: torch.Tensor, zc2: torch.Tensor, zy: torch.Tensor, beta: float
) -> tuple[float, float, float]:
    """NLL of softmax(β·z) and its first two derivatives in β (float64).

    With ``zc = z − max z`` per row (the NLL is shift invariant), ``s = Σ_k exp(β zc_k)``:
    ``f = mean(log s − β zc_y)``, ``f' = mean(E_p[zc] − zc_y)``, ``f'' = mean(Var_p[zc]) ≥ 0``.
    """
    e = torch.exp(zc * beta)
    s = e.sum(dim=1)
    m1 = torch.einsum("nc,nc->n", e, zc) / s
    m2 = torch.einsum("nc,nc->n", e, zc2) / s
    f = float((torch.log(s) - beta * zy).mean())
    g = float((m1 - zy).mean())
    h = float((m2 - m1 * m1).clamp(min=0.0).mean())
    return f, g, h


@register("temperature")
class TemperatureScaling(Base):
    """Temperature scaling (Guo et al. 2017): ``z ↦ z / T`` with the exact NLL-optimal ``T``.

    ``NLL(β) = mean_i[logsumexp(β z_i) − β z_{i,y_i}]`` with ``β = 1/T`` is convex in β
    (``NLL'' = mean Var_p(z) ≥ 0``), so the optimum is unique. ``fit`` solves ``NLL'(β) = 0`` by
    Newton's method in float64, safeguarded by a bracket on β that falls back to geometric
    bisection, until ``|dNLL/d log T| = β·|NLL'(β)| ≤ tol`` (default 1e-10).

    Degenerate inputs end at a bound with a ``RuntimeWarning``, never at NaN or 1e7, and are
    detected exactly before solving: separable data (every label holds its row's top logit, so
    NLL falls as T → 0) give ``T = T_MIN = 0.01``; logits no better than uniform
    (``NLL'(β → 0) = mean(mean_k z_k − z_y) ≥ 0``, optimum at T → ∞) give ``T = T_MAX = 100``;
    constant rows (zero gradient, every T equally good) give ``T = 1``. An interior optimum
    outside ``[T_MIN, T_MAX]`` also stops at the nearer bound with a warning.

    Attributes: ``temperature``, ``n_iter`` (NLL evaluations), ``grad_log_t`` (final
    dNLL/d log T), ``converged``, ``nll`` (val NLL at ``temperature``).
    """

    name: ClassVar[str] = "temperature"
    preserves_argmax: ClassVar[bool] = True

    def __init__(self, *, tol: float = 1e-10, max_iter: int = 100) -> None:
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}.")
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}.")
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.temperature: float | None = None
        self.n_iter = 0
        self.grad_log_t = float("nan")
        self.converged = False
        self.nll = float("nan")

    @classmethod
    def fixed(cls, temperature: float) -> TemperatureScaling:
        """A ready-to-apply scaler with a given T (e.g. the fp32 model's T on a quantized one)."""
        t = float(temperature)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
        out = cls()
        out.temperature = t
        return out

    @property
    def fitted(self) -> bool:
        return self.temperature is not None

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> TemperatureScaling:
        z, y = fit_inputs(logits, labels)
        zc = z - z.amax(dim=1, keepdim=True)
        zy = zc.gather(1, y[:, None]).squeeze(1)
        if bool((zc.amin(dim=1) == 0).all()):
            warnings.warn(
                "temperature scaling: every logit row is constant, so every T gives the same "
                "NLL; using T = 1.",
                RuntimeWarning,
                stacklevel=2,
            )
            self._set(1.0, 0, 0.0, True, float(math.log(z.shape[1])))
            return self
        if bool((zy == 0).all()):
            warnings.warn(
                "temperature scaling: the validation data are separable (every label has the "
                f"top logit, so NLL keeps falling as T -> 0); using the bound T = {T_MIN:g}.",
                RuntimeWarning,
                stacklevel=2,
            )
            f, g, _ = _ts_terms(zc, zc * zc, zy, 1.0 / T_MIN)
            self._set(T_MIN, 1, -g / T_MIN, False, f)
            return self
        if float((zc.mean(dim=1) - zy).mean()) >= 0:  # NLL'(β → 0) ≥ 0: optimum at T → ∞
            warnings.warn(
                "temperature scaling: the logits are no better than uniform (NLL keeps falling "
                f"as T grows); using the bound T = {T_MAX:g}.",
                RuntimeWarning,
                stacklevel=2,
            )
            f, g, _ = _ts_terms(zc, zc * zc, zy, 1.0 / T_MAX)
            self._set(T_MAX, 1, -g / T_MAX, False, f)
            return self
        beta, evals, grad, f, ok = self._solve(zc, zc * zc, zy)
        self._set(1.0 / beta, evals, -beta * grad, ok, f)
        return self

    def _solve(
        self, zc: torch.Tensor, zc2: torch.Tensor, zy: torch.Tensor
    ) -> tuple[float, int, float, float, bool]:
        """Safeguarded Newton on NLL'(β) = 0 over [1/T_MAX, 1/T_MIN]; returns β, evals, NLL'(β),
        NLL(β), converged. A Newton step that leaves the current bracket becomes a geometric
        bisection; a bracket that collapses onto an end of the interval means the optimum lies
        beyond it (warned, returned at the bound)."""
        b_lo, b_hi = 1.0 / T_MAX, 1.0 / T_MIN
        lo, hi = b_lo, b_hi
        beta = 1.0
        f = g = float("nan")
        for evals in range(1, self.max_iter + 1):
            f, g, h = _ts_terms(zc, zc2, zy, beta)
            if beta * abs(g) <= self.tol:
                return beta, evals, g, f, True
            if g > 0:
                hi = beta
            else:
                lo = beta
            if hi / lo - 1.0 < 1e-13:
                edge = b_hi if g < 0 else b_lo
                if abs(math.log(beta / edge)) > 1e-9:
                    return beta, evals, g, f, True  # interior optimum at float64 resolution
                reason = (
                    "the validation data look separable (NLL keeps falling as T -> 0)"
                    if g < 0
                    else "the logits are no better than uniform (NLL keeps falling as T grows)"
                )
                warnings.warn(
                    f"temperature scaling: {reason}; stopping at the bound T = {1.0 / edge:g}.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                f, g, _ = _ts_terms(zc, zc2, zy, edge)
                return edge, evals + 1, g, f, False
            if evals == self.max_iter:
                break  # return the last point evaluated: its NLL and gradient describe it
            step = beta - g / h if h > 0 else float("nan")
            beta = step if lo < step < hi else math.sqrt(lo * hi)
        warnings.warn(
            f"temperature scaling did not converge in {self.max_iter} evaluations "
            f"(|dNLL/dlogT| = {beta * abs(g):.3g}).",
            RuntimeWarning,
            stacklevel=3,
        )
        return beta, self.max_iter, g, f, False

    def _set(self, t: float, n_iter: int, grad: float, ok: bool, f: float) -> None:
        self.temperature = float(t)
        self.n_iter = int(n_iter)
        self.grad_log_t = float(grad)
        self.converged = bool(ok)
        self.nll = float(f)

    def __call__(self, logits: ArrayLike) -> ArrayLike:
        z = apply_input(logits)
        self._require_fitted(z)
        cdtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        return output(z.to(cdtype) / self.temperature, logits, z)

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "temperature": self.temperature,
            "n_iter": self.n_iter,
            "grad_log_t": None if math.isnan(self.grad_log_t) else self.grad_log_t,
            "converged": self.converged,
            "nll": None if math.isnan(self.nll) else self.nll,
            "tol": self.tol,
            "max_iter": self.max_iter,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TemperatureScaling:
        check_state(cls, state)
        out = cls(tol=state.get("tol", 1e-10), max_iter=state.get("max_iter", 100))
        t = state.get("temperature")
        out.temperature = None if t is None else float(t)
        out.n_iter = int(state.get("n_iter", 0))
        nan = float("nan")
        out.grad_log_t = nan if state.get("grad_log_t") is None else float(state["grad_log_t"])
        out.converged = bool(state.get("converged", False))
        out.nll = nan if state.get("nll") is None else float(state["nll"])
        return out


# ----------------------------------------------------------------------------------------------
# vector and matrix scaling
# ----------------------------------------------------------------------------------------------
class _AffineScaling(Base):
    """Shared fit of an affine logit map by L-BFGS (scipy, float64, analytic gradients).

    Objective: ``mean_i CE(map(z_i), y_i) + (l2/2)·(‖A − A₀‖² + ‖b‖²)`` where ``A₀`` is the
    identity map, so the small ridge pulls towards "no change" and keeps the problem strictly
    convex (also when a class never occurs in val). The gradient of the mean CE with respect
    to the mapped logits is ``G = (softmax − onehot)/N``; ``b`` gets ``Σ_i G_i``. Runs until
    the largest gradient entry is below ``tol`` (default 1e-6; L-BFGS runs at most 3 times, the
    first run and 2 restarts, then a ``RuntimeWarning`` if still above). scipy is used rather
    than ``torch.optim.LBFGS``, whose first use imports ``torch._dynamo`` (seconds).
    """

    preserves_argmax: ClassVar[bool] = False

    def __init__(self, *, l2: float = 1e-4, tol: float = 1e-6, max_iter: int = 1000) -> None:
        if not (l2 >= 0 and math.isfinite(l2)):
            raise ValueError(f"l2 must be a finite number >= 0, got {l2}.")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}.")
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}.")
        self.l2, self.tol, self.max_iter = float(l2), float(tol), int(max_iter)
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.n_classes = None
        self.n_iter = 0
        self.grad_max = float("nan")
        self.converged = False

    @property
    def fitted(self) -> bool:
        return self.weight is not None

    @abc.abstractmethod
    def _init_weight(self, c: int) -> torch.Tensor: ...

    @abc.abstractmethod
    def _map(self, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _weight_grad(self, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Gradient of ``Σ_ik G_ik map(z)_ik`` with respect to the weight."""
        ...

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> _AffineScaling:
        from scipy.optimize import minimize

        z, y = fit_inputs(logits, labels)
        z, y = z.cpu(), y.cpu()
        n, c = z.shape
        w0 = self._init_weight(c)
        n_w = w0.numel()
        onehot = torch.nn.functional.one_hot(y, c).double()

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            t = torch.from_numpy(theta)
            w, b = t[:n_w].reshape(w0.shape), t[n_w:]
            logp = torch.log_softmax(self._map(z, w, b), dim=1)
            dw, db = w - w0, b
            loss = -(logp * onehot).sum() / n + 0.5 * self.l2 * (dw.pow(2).sum() + db.pow(2).sum())
            g = (logp.exp() - onehot) / n
            grad_w = self._weight_grad(g, z) + self.l2 * dw
            grad_b = g.sum(dim=0) + self.l2 * db
            return float(loss), torch.cat([grad_w.reshape(-1), grad_b]).numpy()

        theta = torch.cat([w0.reshape(-1), torch.zeros(c, dtype=torch.float64)]).numpy()
        self.n_iter = 0
        for _ in range(3):
            res = minimize(
                objective,
                theta,
                jac=True,
                method="L-BFGS-B",
                options={"maxiter": self.max_iter, "gtol": self.tol, "ftol": 1e-15},
            )
            theta, self.n_iter = res.x, self.n_iter + int(res.nit)
            self.grad_max = float(np.abs(objective(theta)[1]).max())
            if self.grad_max <= self.tol:
                break
        self.converged = self.grad_max <= self.tol
        if not self.converged:
            warnings.warn(
                f"{type(self).__name__}: L-BFGS stopped with max |gradient| = "
                f"{self.grad_max:.3g} > {self.tol:g} after {self.n_iter} iterations.",
                RuntimeWarning,
                stacklevel=2,
            )
        t = torch.from_numpy(theta)
        self.weight, self.bias, self.n_classes = t[:n_w].reshape(w0.shape).clone(), t[n_w:], c
        return self

    def __call__(self, logits: ArrayLike) -> ArrayLike:
        z = apply_input(logits)
        self._require_fitted(z)
        out = self._map(z.double(), self.weight.to(z.device), self.bias.to(z.device))
        return output(out, logits, z)

    def state_dict(self) -> dict[str, Any]:
        fitted = self.fitted
        return {
            "name": self.name,
            "l2": self.l2,
            "tol": self.tol,
            "max_iter": self.max_iter,
            "weight": self.weight.tolist() if fitted else None,
            "bias": self.bias.tolist() if fitted else None,
            "n_iter": self.n_iter,
            "grad_max": self.grad_max if fitted else None,
            "converged": self.converged,
        }

    @classmethod
    def from_state_dict(cls: type[R], state: dict[str, Any]) -> R:
        check_state(cls, state)
        out = cls(l2=state["l2"], tol=state["tol"], max_iter=state["max_iter"])
        if state.get("weight") is not None:
            out.weight = torch.tensor(state["weight"], dtype=torch.float64)
            out.bias = torch.tensor(state["bias"], dtype=torch.float64)
            out.n_classes = int(out.bias.shape[0])
            out.grad_max = float(state["grad_max"])
        out.n_iter = int(state.get("n_iter", 0))
        out.converged = bool(state.get("converged", False))
        return out


@register("vector")
class VectorScaling(_AffineScaling):
    """Vector scaling (Guo et al. 2017): ``z ↦ w ⊙ z + b`` with per-class ``w, b ∈ R^C``.

    Not argmax preserving: per-class scales and biases can reorder classes.
    """

    name: ClassVar[str] = "vector"

    @classmethod
    def fit_parameters(cls, n_classes: int | None = None) -> int | None:
        return None if n_classes is None else 2 * n_classes

    def _init_weight(self, c: int) -> torch.Tensor:
        return torch.ones(c, dtype=torch.float64)

    def _map(self, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return z * w + b

    def _weight_grad(self, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (g * z).sum(dim=0)


@register("matrix")
class MatrixScaling(_AffineScaling):
    """Matrix scaling (Guo et al. 2017): ``z ↦ W z + b`` with ``W ∈ R^{C×C}``, ridge towards I.

    Not argmax preserving; C² parameters, so it needs a large val split (or a larger ``l2``).
    """

    name: ClassVar[str] = "matrix"

    @classmethod
    def fit_parameters(cls, n_classes: int | None = None) -> int | None:
        return None if n_classes is None else n_classes * n_classes + n_classes

    def _init_weight(self, c: int) -> torch.Tensor:
        return torch.eye(c, dtype=torch.float64)

    def _map(self, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return z @ w.T + b

    def _weight_grad(self, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return g.T @ z
