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

Making the copy costs the sending process that import too (13-35 ms, on the
way to a spawned ``Process``'s start or a spawn pool's first result), so it
is left out where the receiving process will have the function for certain
(:func:`rerun_by_children`): a spawn or forkserver child runs the script
again, and a ``def`` at the start of a line of the script is at its top
level, run by every import of it. A child that still finds no such function,
or another version of it (the file was changed meanwhile), fails with an
error that says so instead of running something else.

Light on purpose: a spawned ``procpool.Process`` child imports this module
to rebuild its target, and nothing it does not use.
"""

from __future__ import annotations

import marshal
import os
import pickle
import sys
import types

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["ScriptFunction", "of_main", "rerun_by_children", "script_function"]


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


def rerun_by_children(fn: types.FunctionType) -> bool:
    """Whether a spawn or forkserver child of this process will define ``fn``
    itself, as it imports the script again (``multiprocessing.spawn.prepare``):
    ``fn`` is ``__main__``'s binding of its name, and its ``def`` starts a line
    of the script, so that it is at the top level of the module (a ``def``
    under the ``__main__`` guard or in a function is indented). Decorated
    functions are not claimed: their code starts at the decorator's line.
    """
    main = sys.modules.get("__main__")
    if main is None or getattr(main, fn.__name__, None) is not fn:
        return False
    path = getattr(main, "__file__", None)
    if not path or fn.__code__.co_filename != path:
        return False
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        # ``python -m pkg`` runs pkg/__main__.py, which children do not run again.
        if name == "__main__" or name.endswith(".__main__"):
            return False
    elif os.path.splitext(os.path.basename(path))[0] == "ipython":
        return False  # the stdlib leaves IPython's launcher alone
    line = _line(path, fn.__code__.co_firstlineno)
    for keyword in (b"def ", b"async def "):
        if line.startswith(keyword):
            rest = line[len(keyword) :].lstrip(b" \t")
            head = fn.__name__.encode()
            return rest.startswith(head) and rest[len(head) : len(head) + 1] in (b"(", b" ", b"\t")
    return False


def _line(path: str, lineno: int) -> bytes:
    """Line ``lineno`` of the file, as bytes; empty if there is none."""
    try:
        with open(path, "rb") as file:
            for number, line in enumerate(file, 1):
                if number == lineno:
                    return line
    except OSError:
        pass
    return b""


class ScriptFunction:
    """A function of ``__main__`` on its way to another process, rebuilt there
    by :func:`script_function`.

    Args:
        fn: The function (see :func:`of_main`).
        by_value: Its copy, pickled by value (with cloudpickle); None where the
            receiving process will have the function (:func:`rerun_by_children`).

    Raises:
        ValueError: if marshal cannot write the function's code (a constant
            of a kind it does not know): send the copy alone.
    """

    __slots__ = ("_args",)

    def __init__(self, fn: types.FunctionType, by_value: bytes | None) -> None:
        self._args = (fn.__name__, marshal.dumps(fn.__code__), by_value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (script_function, self._args)


def script_function(name: str, code: bytes, by_value: bytes | None) -> Any:
    """This process's own ``__main__`` function ``name`` if its code is
    ``code``; else the copy, unpickled (see the module docstring).

    Raises:
        SerializationError: if there is no copy, and this process's function
            of that name is missing or another.
    """
    main = sys.modules.get("__main__")
    own = getattr(main, name, None)
    if (
        type(own) is types.FunctionType
        and own.__qualname__ == name
        and own.__code__ == marshal.loads(code)
    ):
        return own
    if by_value is None:
        from .._exceptions import SerializationError

        found = "no such function" if own is None else "another version of it"
        raise SerializationError(
            f"the script's function {name!r} was sent by name, and this process, "
            f"which imported the script ({getattr(main, '__file__', '?')}) again, "
            f"found {found}: was the file changed since the program started?"
        )
    return pickle.loads(by_value)
