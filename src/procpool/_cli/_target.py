"""TARGET: the user's function, named ``package.module:function`` or ``path/to/file.py:function``.

The parent resolves the target once before any work starts, so a typo exits
with status 2 and one line instead of a page of identical worker errors. Each
worker then imports it again by the same recipe (cached per worker): a target
is passed by name, never pickled, so it behaves exactly as an import would.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

TYPE_CHECKING = False  # not typing's (see _core/_generic.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Target", "TargetError", "load_target", "parse_target"]


class TargetError(Exception):
    """TARGET is malformed, cannot be imported, or does not name a callable."""


@dataclass(frozen=True)
class Target:
    """A parsed TARGET: where the module comes from and the attribute path inside it.

    Attributes:
        spec: The TARGET as the user wrote it.
        module: A dotted module name, or None when ``path`` is used.
        path: Absolute path of a ``.py`` file, or None.
        attr: Dotted attribute path inside the module (``fn`` or ``Class.method``).
        search_dir: Put first on ``sys.path`` before importing: the working
            directory for a module name (as ``python -m`` does), the file's
            directory for a path (as ``python file.py`` does).
    """

    spec: str
    module: str | None
    path: str | None
    attr: str
    search_dir: str


def parse_target(spec: str, cwd: str | None = None) -> Target:
    """Split ``spec`` into module (or file) and function.

    Raises:
        TargetError: if ``spec`` has no ``:function`` part or an empty side.
    """
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise TargetError(
            f"TARGET must look like 'package.module:function' or 'path/to/file.py:function', "
            f"not {spec!r}"
        )
    cwd = cwd or os.getcwd()
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = os.path.abspath(os.path.join(cwd, where))
        return Target(spec, None, path, attr, os.path.dirname(path))
    return Target(spec, where, None, attr, cwd)


# Per process: a worker loads each target once.
_loaded: dict[Target, Callable[[Any], Any]] = {}


def load_target(target: Target) -> Callable[[Any], Any]:
    """Import the target's module and return the callable (cached per process).

    Raises:
        TargetError: with a one-line reason, if it cannot be imported or is not callable.
    """
    fn = _loaded.get(target)
    if fn is None:
        fn = _loaded[target] = _load(target)
    return fn


def _load(target: Target) -> Callable[[Any], Any]:
    if target.search_dir not in sys.path:
        sys.path.insert(0, target.search_dir)
    try:
        module = (
            _import_file(target.path)
            if target.path
            else importlib.import_module(target.module or "")
        )
    except TargetError:
        raise
    except BaseException as exc:
        where = target.path or target.module
        raise TargetError(f"cannot import {where}: {_one_line(exc)}") from exc
    obj: Any = module
    for part in target.attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(
                f"{module.__name__} has no attribute {target.attr!r} (from TARGET {target.spec!r})"
            ) from None
    if not callable(obj):
        raise TargetError(f"{target.spec!r} is a {type(obj).__name__}, not a callable")
    return obj  # type: ignore[no-any-return]


def _import_file(path: str) -> ModuleType:
    if not os.path.isfile(path):
        raise TargetError(f"cannot import {path}: no such file")
    name = os.path.splitext(os.path.basename(path))[0]
    existing = sys.modules.get(name)
    if existing is not None and os.path.abspath(getattr(existing, "__file__", "") or "") == path:
        return existing
    if existing is not None or not name.isidentifier():
        # The stem is taken (e.g. a file called json.py): register under a
        # private name rather than shadow a module someone else imported.
        name = "procpool_target_" + hashlib.blake2b(path.encode(), digest_size=6).hexdigest()
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    # Registered before running, as a normal import does: dataclasses, pickle
    # and typing look the module up by name while it executes.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        text = f"SyntaxError: {exc.msg} (line {exc.lineno})"
    return " ".join(text.split())
