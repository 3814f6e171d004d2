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

__all__ = [
    "ScriptFunction",
    "by_name_in_script",
    "of_main",
    "rerun_by_children",
    "script_class",
    "script_function",
]


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
    path = _rerun_script(fn)
    if path is None or fn.__code__.co_filename != path:
        return False
    line = _line(path, fn.__code__.co_firstlineno)
    for keyword in (b"def ", b"async def "):
        if line.startswith(keyword):
            rest = line[len(keyword) :].lstrip(b" \t")
            head = fn.__name__.encode()
            return rest.startswith(head) and rest[len(head) : len(head) + 1] in (b"(", b" ", b"\t")
    return False


def _rerun_script(obj: Any) -> str | None:
    """The path of the script a spawn or forkserver child imports again, if
    ``obj`` is ``__main__``'s binding of its name there; else None."""
    main = sys.modules.get("__main__")
    if main is None or getattr(main, obj.__name__, None) is not obj:
        return None
    path = getattr(main, "__file__", None)
    if not path:
        return None
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        # ``python -m pkg`` runs pkg/__main__.py, which children do not run again.
        if name == "__main__" or name.endswith(".__main__"):
            return None
    elif os.path.splitext(os.path.basename(path))[0] == "ipython":
        return None  # the stdlib leaves IPython's launcher alone
    return str(path)


def by_name_in_script(obj: type | types.FunctionType) -> tuple[Any, ...] | None:
    """How a spawn or forkserver child gets ``obj``, a function or class of the
    script, by name: a reduce tuple for pickle, or None if the child will not
    have it (not at the script's top level) or it cannot go so.

    A class whose ``class`` statement starts a line of the script is defined
    by the child's import of it too; it goes with its name and its functions'
    code, which the child compares with its own (script_class), as a
    function's code is (ScriptFunction).
    """
    if isinstance(obj, types.FunctionType):
        if not (of_main(obj) and rerun_by_children(obj)):
            return None
        try:
            return ScriptFunction(obj, None).__reduce__()
        except ValueError:  # a constant marshal cannot write
            return None
    if obj.__module__ not in ("__main__", "__mp_main__") or obj.__qualname__ != obj.__name__:
        return None
    path = _rerun_script(obj)
    if path is None or not _starts_a_line(path, b"class " + obj.__name__.encode()):
        return None
    try:
        return script_class, (obj.__name__, marshal.dumps(_class_code(obj)))
    except ValueError:  # a constant marshal cannot write
        return None


def _class_code(cls: type) -> list[tuple[str, types.CodeType]]:
    """The code of ``cls``'s own functions, by name."""
    return sorted(
        (name, member.__code__)
        for name, member in vars(cls).items()
        if isinstance(member, types.FunctionType)
    )


def _starts_a_line(path: str, head: bytes) -> bool:
    """Whether a line of the file starts with ``head`` then ``(``, ``:`` or a space."""
    try:
        with open(path, "rb") as file:
            return any(
                line.startswith(head) and line[len(head) : len(head) + 1] in (b"(", b":", b" ")
                for line in file
            )
    except OSError:
        return False


def script_class(name: str, code: bytes) -> type:
    """This process's own ``__main__`` class ``name``, if its functions have
    the code ``code`` (see by_name_in_script).

    Raises:
        SerializationError: if it has no such class, or another version of it.
    """
    main = sys.modules.get("__main__")
    own = getattr(main, name, None)
    if (
        isinstance(own, type)
        and own.__qualname__ == name
        and _class_code(own) == marshal.loads(code)
    ):
        return own
    from .._exceptions import SerializationError

    found = "no such class" if own is None else "another version of it"
    raise SerializationError(
        f"the script's class {name!r} was sent by name, and this process, which "
        f"imported the script ({getattr(main, '__file__', '?')}) again, found "
        f"{found}: was the file changed since the program started?"
    )


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
