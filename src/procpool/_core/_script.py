"""How a function of the program's script travels to another process.

The standard library pickles a function of ``__main__`` by name, so a child
runs its own (forked, or imported again by spawn and the fork server), with
the module's globals: an initializer that sets a global and a task that
reads it share it. procpool sends such a function with its copy by value too,
for a process that lacks it (one defined after a worker started, under the
script's ``__main__`` guard, or in a notebook or ``python -c``).

:class:`ScriptFunction` carries both: the function's name and code, and the
copy. :func:`script_function` rebuilds it in the receiving process: that
process's own ``__main__`` function of that name if it has the same code, and
only else the copy. The copy is unpickled only then, since that imports
cloudpickle: ~13-20 ms of a spawned process's way to its first task.

Light on purpose: a spawned ``procpool.Process`` child imports this module
to rebuild its target, and nothing it does not use.
"""

from __future__ import annotations

import marshal
import pickle
import sys
import types

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["ScriptFunction", "of_main", "script_function"]


def of_main(fn: object) -> bool:
    """Whether ``fn`` is a function defined at the top of ``__main__``: one that
    another process may have by name. (``__mp_main__`` is the script as a
    spawned process imported it again: a pool made there sends its functions.)"""
    return (
        isinstance(fn, types.FunctionType)
        and fn.__module__ in ("__main__", "__mp_main__")
        and fn.__qualname__ == fn.__name__
        and fn.__name__.isidentifier()
    )


class ScriptFunction:
    """A function of ``__main__`` on its way to another process, rebuilt there
    by :func:`script_function`.

    Args:
        fn: The function (see :func:`of_main`).
        by_value: Its copy, pickled by value (with cloudpickle).

    Raises:
        ValueError: if marshal cannot write the function's code (a constant
            of a kind it does not know): send the copy alone.
    """

    __slots__ = ("_args",)

    def __init__(self, fn: types.FunctionType, by_value: bytes) -> None:
        self._args = (fn.__name__, marshal.dumps(fn.__code__), by_value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (script_function, self._args)


def script_function(name: str, code: bytes, by_value: bytes) -> Any:
    """This process's own ``__main__`` function ``name`` if its code is
    ``code``; else the copy, unpickled (see the module docstring)."""
    own = getattr(sys.modules.get("__main__"), name, None)
    if (
        type(own) is types.FunctionType
        and own.__qualname__ == name
        and own.__code__ == marshal.loads(code)
    ):
        return own
    return pickle.loads(by_value)
