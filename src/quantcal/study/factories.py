"""The study's models: a registry name, ``timm:NAME`` or a user's ``module:factory``, built for
the data, and checkpoints loaded into them (``weights_only=True``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["build_model", "import_factory", "load_state", "load_weights", "reparameterizer"]


def import_factory(arch: str) -> Callable[..., Any]:
    """The callable named by ``module:function`` or ``path/to/file.py:function`` (or, for
    ``timm:NAME``, a factory of timm's model NAME: :func:`quantcal.models.external.timm_factory`).

    A module is looked up on ``sys.path`` and then in the current folder; a ``.py`` path is
    loaded from that file (no ``PYTHONPATH`` needed). ValueError saying how to fix it if not."""
    import importlib
    import importlib.util
    import sys

    from quantcal.models.external import TIMM_PREFIX, timm_factory

    if arch.lower().startswith(TIMM_PREFIX):
        return timm_factory(arch[len(TIMM_PREFIX) :])
    mod_name, _, fn_name = arch.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser().resolve()
            if not path.is_file():
                raise ImportError(f"no file {path}")
            name = f"quantcal_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, path)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load {path} as a Python module")
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            try:
                module = importlib.import_module(mod_name)
            except ModuleNotFoundError:
                cwd = str(Path.cwd())
                if cwd in sys.path or not (
                    Path(cwd, *mod_name.split(".")).with_suffix(".py").is_file()
                    or Path(cwd, *mod_name.split("."), "__init__.py").is_file()
                ):
                    raise
                sys.path.append(cwd)
                module = importlib.import_module(mod_name)
        return getattr(module, fn_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"cannot import model factory {arch!r}: {exc}. Give 'module:function' (the module "
            "on PYTHONPATH or in the current folder) or 'path/to/file.py:function'"
        ) from exc


def build_model(
    arch: str,
    *,
    num_classes: int,
    image_size: int,
    in_chans: int,
    width: float,
    seed: int | None = None,
):
    """A registry model, ``timm:NAME``, or ``module:factory``: a callable imported from a
    module and called with whichever of (num_classes, image_size, in_chans, width) its
    signature accepts."""
    import inspect as pyinspect

    from quantcal import models

    if ":" not in arch:
        return models.create_model(
            arch,
            num_classes=num_classes,
            image_size=image_size,
            in_chans=in_chans,
            width=width,
            seed=seed,
        )
    factory = import_factory(arch)
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    offered = {
        "num_classes": num_classes,
        "image_size": image_size,
        "in_chans": in_chans,
        "width": width,
    }
    params = pyinspect.signature(factory).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return factory(**{k: v for k, v in offered.items() if takes_all or k in params})


def load_weights(model, path: str | Path):
    """Load a checkpoint into ``model`` with ``weights_only=True``: a quantcal ``model.pt`` or
    ``last.pt``, a dict with ``state_dict``, or a bare state dict."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}. It must be a "
            "torch.save'd state dict (weights only); re-save it with "
            "torch.save(model.state_dict(), path)"
        ) from exc
    return load_state(model, obj, path)


def load_state(model, obj: Any, where: str | Path):
    """Load a loaded checkpoint object (see :func:`load_weights`) into ``model``; eval mode."""
    state = obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if not isinstance(state, dict):
        raise ValueError(
            f"checkpoint {where} holds a {type(state).__name__}, not a state dict; re-save it "
            "with torch.save(model.state_dict(), path)"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        shown = " ".join(lines[:3]) + (
            f" ... ({len(lines) - 3} more lines)" if len(lines) > 3 else ""
        )
        raise ValueError(
            f"checkpoint {where} does not fit the model: {shown}. Check the model name, width and "
            "number of classes"
        ) from exc
    return model.eval()


def reparameterizer(arch: str) -> Callable[..., Any] | None:
    """The deploy-form helper a ``module:factory`` declares as ``factory.reparameterize``
    (a callable, or a ``module:function`` string), else None (the blocks' own methods)."""
    if ":" not in arch:
        return None
    helper = getattr(import_factory(arch), "reparameterize", None)
    if isinstance(helper, str):
        helper = import_factory(helper)
    if helper is not None and not callable(helper):
        raise ValueError(
            f"{arch}.reparameterize must be a callable or a 'module:function' "
            f"string, got {type(helper).__name__}"
        )
    return helper
