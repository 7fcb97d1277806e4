"""Named, removable hooks around a model's forward pass (in the style of diffusers' ``HookRegistry``).

A technique that changes how a denoiser computes (CHAI's Cache Attention; an intra-request cache that
reuses block outputs across steps, after MixCache) is a :class:`ModelHook`: it wraps the model call
and may read or replace what flows through it. Hooks are attached by name to one model through its
:class:`HookRegistry`, run outermost-first in attach order, and come off again by name, leaving the
model exactly as it was. Two hooks that must not run together say so (:attr:`ModelHook.incompatible`),
and the registry refuses to stack them.

::

    registry = HookRegistry.of(model)                  # one per model, made on first use
    with registry.attached(CacheAttention(model, config, cached)):
        latent = rflow.sample(model, z, ...)           # model(...) now runs the hook chain
    # detached again here, also on error

How the chain works: the registry replaces the *instance's* ``forward`` with a function that calls
the first hook's :meth:`ModelHook.forward` with a ``call_next`` that leads to the next hook and, last,
to the class's own ``forward``. ``model(...)`` keeps running ``nn.Module.__call__`` (its torch hooks,
``no_grad`` and friends); when the last hook is detached the instance attribute is removed.

Nothing here knows a particular model: any ``torch.nn.Module`` works (STDiT3 exposes its registry as
``model.hooks``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

__all__ = ["ModelHook", "HookRegistry", "HookError"]

_ATTRIBUTE = "_chai_hook_registry"


class HookError(ValueError):
    """A hook cannot be attached (name taken, incompatible with an attached hook) or is not there."""


class ModelHook:
    """One technique wrapped around a model's forward pass.

    Subclasses set :attr:`name` and override :meth:`forward` (and, when they keep per-run state,
    :meth:`on_attach` / :meth:`on_detach`).

    Attributes:
        name: the hook's registry name (unique per model), e.g. ``"cache_attention"``.
        incompatible: names of hooks this one must never be stacked with (checked both ways), e.g.
            an intra-request cache that skips block 0 at the steps where Cache Attention replaces
            its keys and values.
    """

    name: str = ""
    incompatible: Tuple[str, ...] = ()

    def on_attach(self, model: torch.nn.Module) -> None:
        """Called once when attached to ``model`` (before its first hooked call)."""

    def on_detach(self, model: torch.nn.Module) -> None:
        """Called once when detached (also when the hooked run raised)."""

    def report(self) -> Optional[Dict[str, Any]]:
        """JSON-ready statistics of the hook's run, for the request's report (None: nothing to report)."""
        return None

    def forward(self, call_next: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The hooked model call: return ``call_next(*args, **kwargs)`` or anything in its place.

        ``call_next`` runs the rest of the chain (the next hook, last the model's own forward) with
        whatever arguments this hook passes on; it may be called zero, one or several times.
        """
        return call_next(*args, **kwargs)


class HookRegistry:
    """The hooks attached to one model, in attach order (the first attached is the outermost).

    Get it with :meth:`of` (it is stored on the model); attach with :meth:`attach` or, for one run,
    :meth:`attached`.

    Raises (:class:`HookError`, a ValueError): a second hook of the same name; a hook incompatible
    with one attached (either side declaring it); detaching a name that is not attached.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._hooks: Dict[str, ModelHook] = {}

    @classmethod
    def of(cls, model: torch.nn.Module) -> "HookRegistry":
        """The registry of ``model``, made on first use."""
        registry = model.__dict__.get(_ATTRIBUTE)
        if registry is None:
            registry = cls(model)
            model.__dict__[_ATTRIBUTE] = registry
        return registry

    # ------------------------------------------------------------------ membership
    @property
    def names(self) -> List[str]:
        """Attached hook names, outermost first."""
        return list(self._hooks)

    def get(self, name: str) -> Optional[ModelHook]:
        """The hook attached under ``name``, or None."""
        return self._hooks.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._hooks

    def __len__(self) -> int:
        return len(self._hooks)

    def attach(self, hook: ModelHook, name: Optional[str] = None) -> ModelHook:
        """Attach ``hook`` under ``name`` (default ``hook.name``) as the innermost hook; returns it.

        Raises:
            HookError: empty name, the name is taken, or ``hook`` and an attached hook are
                incompatible (the message names both).
            TypeError: ``hook`` is not a :class:`ModelHook`.
        """
        if not isinstance(hook, ModelHook):
            raise TypeError(f"a model hook must be a ModelHook, got {type(hook).__name__}")
        key = name or hook.name
        if not key:
            raise HookError(f"{type(hook).__name__} has no name: set its `name` or pass name=")
        if key in self._hooks:
            raise HookError(f"a hook named {key!r} is already attached to this model; detach it first")
        for other_name, other in self._hooks.items():
            if other_name in hook.incompatible or key in other.incompatible:
                raise HookError(f"hook {key!r} cannot be stacked with the attached hook {other_name!r} "
                                "(one declares the other incompatible); detach it first")
        hook.on_attach(self.model)
        self._hooks[key] = hook
        self._install()
        return hook

    def detach(self, name: str) -> ModelHook:
        """Detach the hook attached under ``name`` and return it. Raises HookError when none is."""
        if name not in self._hooks:
            raise HookError(f"no hook named {name!r} is attached (attached: {', '.join(self._hooks) or 'none'})")
        hook = self._hooks.pop(name)
        self._install()
        hook.on_detach(self.model)
        return hook

    @contextlib.contextmanager
    def attached(self, hook: ModelHook, name: Optional[str] = None) -> Iterator[ModelHook]:
        """``with registry.attached(hook): ...``: attached for the block, detached after it (also on error)."""
        self.attach(hook, name)
        key = name or hook.name
        try:
            yield hook
        finally:
            if self._hooks.get(key) is hook:
                self.detach(key)

    # ------------------------------------------------------------------ the chain
    def _install(self) -> None:
        """Route the instance's forward through the hooks (or restore the class's when none is left)."""
        if not self._hooks:
            self.model.__dict__.pop("forward", None)
            return
        original = type(self.model).forward.__get__(self.model)
        chain = list(self._hooks.values())

        def run(index: int, *args: Any, **kwargs: Any) -> Any:
            if index == len(chain):
                return original(*args, **kwargs)
            return chain[index].forward(lambda *a, **k: run(index + 1, *a, **k), *args, **kwargs)

        def forward(*args: Any, **kwargs: Any) -> Any:
            return run(0, *args, **kwargs)

        self.model.__dict__["forward"] = forward
