"""Generic classes and protocols without importing ``typing`` at run time.

``typing`` costs a program ~3.5 ms to import (2 cores), and one more shared
library that every fork copies and every child's exit tears down; most
programs that use procpool never import it otherwise. For mypy these names
are typing's own. At run time they are stand-ins that do what procpool's
classes ask of them: ``Generic[T]`` as a base class, a class that can be
subscripted (``procpool.AsyncResult[int]``, as ``multiprocessing``'s can), and
``Protocol`` as a plain base class (procpool checks none at run time).

Modules that need only annotations import ``typing`` under a local
``TYPE_CHECKING = False``, which mypy reads as True.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Generic, Protocol, TypeVar
else:
    import types

    def TypeVar(name, *constraints, **options):
        return name

    class Generic:
        __slots__ = ()
        __class_getitem__ = classmethod(types.GenericAlias)

    class Protocol:
        __slots__ = ()


__all__ = ["Generic", "Protocol", "TypeVar"]
