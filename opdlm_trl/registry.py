"""The one rule of the package's registries (``losses.DIVERGENCES``, ``teachers.TEACHERS``,
``sampling.COMMIT_RULES``): a name maps to one entry, and a second entry under a taken name is refused unless the
caller asks to replace it, so two modules registering the same name cannot silently shadow each other."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["register"]

Entry = TypeVar("Entry")


def register(registry: dict[str, Entry], name: str, entry: Entry, what: str, replace: bool = False) -> Entry:
    """Put ``entry`` under ``name`` in ``registry`` and return it (registering the same entry again is a no-op).

    ``what`` names the kind of entry in the error, e.g. ``"loss"``: ``A loss named 'x' is already registered``.
    """
    taken = registry.get(name)
    if taken is not None and taken is not entry and not replace:
        raise ValueError(
            f"A {what} named {name!r} is already registered ({taken.__module__}.{taken.__qualname__}); choose "
            "another name or pass replace=True."
        )
    registry[name] = entry
    return entry
