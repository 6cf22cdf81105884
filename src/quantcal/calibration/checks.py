"""Input validation shared by the metrics and the recalibrators.

Logits ``(N, C)`` and integer labels ``(N,)`` come as torch tensors or numpy arrays; the
validators return tensors, or raise with a message that says what to pass instead. Finiteness is
checked during the row pass (:func:`check_finite`, given the count of bad rows found there), so
the logits are read only once.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

__all__ = [
    "ArrayLike",
    "as_tensor",
    "check_choice",
    "check_finite",
    "check_n_bins",
    "validate",
    "validate_logits",
]


def as_tensor(x: object, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(
        f"{what} must be a torch.Tensor or a numpy.ndarray, got {type(x).__name__}; "
        f"convert it with torch.as_tensor(...) first."
    )


def validate_logits(logits: ArrayLike) -> torch.Tensor:
    """Check type, dtype and shape of ``logits`` (not finiteness, see ``check_finite``)."""
    z = as_tensor(logits, "logits")
    if not z.is_floating_point():
        raise TypeError(
            f"logits must be a floating-point array (float16/bfloat16/float32/float64), got "
            f"dtype {z.dtype}; pass the raw network outputs, e.g. logits.float()."
        )
    if z.dim() != 2:
        raise ValueError(
            f"logits must be 2-D with shape (N, C), got shape {tuple(z.shape)}; "
            f"flatten extra dimensions or add a batch dimension."
        )
    if z.shape[0] == 0:
        raise ValueError("logits is empty (N = 0): metrics need at least one sample.")
    if z.shape[1] < 2:
        raise ValueError(
            f"logits must have at least 2 classes (columns), got C = {z.shape[1]}; for a "
            f"binary problem with one logit s per sample pass the two columns [0, s]."
        )
    _refuse_probabilities(z)
    return z


def _refuse_probabilities(z: torch.Tensor, head: int = 1024) -> None:
    """Raise when the input holds probabilities: every entry of the first ``head`` rows in
    [0, 1] and each of those rows summing to 1 (within 1e-4). Softmax of probabilities is not
    the model's confidence (``ece(probs)`` came out 0.742 where the truth was 0.027), so this
    is never computed silently; logits of real models do not look like this."""
    if not z.is_floating_point():
        return
    rows = z[:head]
    lo, hi = rows.amin(), rows.amax()
    if not (bool(lo >= 0) and bool(hi <= 1)):
        return
    if bool(((rows.double().sum(dim=1) - 1.0).abs() <= 1e-4).all()):
        raise ValueError(
            "these look like probabilities (every row lies in [0, 1] and sums to 1), but "
            "metrics and recalibrators take logits: softmax applied to probabilities is not the "
            "model's confidence. Pass the logits, or log-probabilities (probs.log(), which have "
            "the same softmax); if the model ends with a softmax, take the layer before it."
        )


def validate(logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared validator: returns ``(logits, labels)`` as tensors on the logits' device.

    Raises TypeError for non-array inputs, floating/bool labels or integer logits; ValueError
    for wrong shapes, an empty input, fewer than 2 classes or labels outside ``[0, C)``.
    Non-finite logits are caught during the row pass (``check_finite``), which reuses the
    row maximum the metric needs anyway instead of reading the logits a second time.
    """
    z = validate_logits(logits)
    y = as_tensor(labels, "labels")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(
            f"labels must be integer class indices, got dtype {y.dtype}; "
            f"convert with labels.long() (or np.asarray(labels, dtype=np.int64))."
        )
    if y.dim() != 1:
        raise ValueError(
            f"labels must be 1-D with shape (N,), got shape {tuple(y.shape)}; "
            f"pass class indices, not one-hot rows."
        )
    if y.shape[0] != z.shape[0]:
        raise ValueError(
            f"shape mismatch: logits has N = {z.shape[0]} rows but labels has "
            f"{y.shape[0]} entries; they must describe the same samples."
        )
    y = y.to(device=z.device, dtype=torch.long)
    n_classes = z.shape[1]
    bad = (y < 0) | (y >= n_classes)
    if bool(bad.any()):
        n_bad = int(bad.sum())
        lo, hi = int(y.min()), int(y.max())
        raise ValueError(
            f"labels must lie in [0, C) = [0, {n_classes}); {n_bad} label(s) do not "
            f"(min {lo}, max {hi}). Check the label encoding and the number of logit columns."
        )
    return z, y


def check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)):
        raise TypeError(f"n_bins must be an int >= 1, got {n_bins!r}.")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}; 15 is the usual choice.")
    return int(n_bins)


def check_choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed values: {', '.join(allowed)}.")
    return value


def check_finite(n_bad_rows: int, n_rows: int) -> None:
    if n_bad_rows:
        raise ValueError(
            f"logits contain NaN or Inf in {n_bad_rows} of {n_rows} rows; metrics need finite "
            f"logits. Look for a diverged model or an overflowing low-precision cast."
        )
