"""Put procpool in the standard library's place, in this process and its children.

``install()`` rebinds every name through which CPython's test suites reach the
stdlib pools, before the test modules are imported (their mixins capture the
class at import time):

* ``multiprocessing.pool.Pool`` -> ``procpool.Pool``
* ``multiprocessing.context.BaseContext.Pool`` (so ``ctx.Pool(...)``) and
  ``multiprocessing.Pool`` (the default context's bound method) -> a
  ``procpool.Pool`` on that context, as the stdlib does
* ``multiprocessing.managers.SyncManager``'s ``Pool`` type -> ``procpool.Pool``
* ``concurrent.futures.ProcessPoolExecutor`` and
  ``concurrent.futures.process.ProcessPoolExecutor`` -> ``procpool.ProcessPoolExecutor``

The runner starts each test process with ``_site/`` on ``PYTHONPATH`` and
``PROCPOOL_CPYTHON_SUBSTITUTE=1``; ``_site/sitecustomize.py`` calls
``install()``, so processes the tests start themselves (``multiprocessing``
children, ``script_helper.assert_python_ok`` scripts) get procpool too.
"""

from __future__ import annotations

import os
import sys
from typing import Any

ENV_FLAG = "PROCPOOL_CPYTHON_SUBSTITUTE"
# os.pathsep-separated directories holding extra CPython test modules
# (e.g. Debian's /usr/lib/python3.11/test when pyenv's build lacks some).
ENV_EXTRA_TESTS = "PROCPOOL_CPYTHON_EXTRA_TESTS"

_installed = False


def install() -> None:
    """Rebind the stdlib pool names to procpool's classes (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    _extend_test_package()
    _substitute_pool()
    _substitute_executor()
    _let_scripts_inherit()


def installed() -> bool:
    return _installed


def _extend_test_package() -> None:
    extra = [d for d in os.environ.get(ENV_EXTRA_TESTS, "").split(os.pathsep) if d]
    if not extra:
        return
    try:
        import test
    except ImportError:
        return
    for directory in extra:
        if directory not in test.__path__:
            test.__path__.append(directory)  # after the interpreter's own


def _substitute_pool() -> None:
    import multiprocessing
    import multiprocessing.context
    import multiprocessing.managers
    import multiprocessing.pool

    from procpool._pool import Pool

    def context_pool(
        self: Any,
        processes: int | None = None,
        initializer: Any = None,
        initargs: Any = (),
        maxtasksperchild: int | None = None,
    ) -> Pool:
        return Pool(processes, initializer, initargs, maxtasksperchild, context=self.get_context())

    context_pool.__qualname__ = "BaseContext.Pool"
    multiprocessing.context.BaseContext.Pool = context_pool  # type: ignore[method-assign]
    multiprocessing.Pool = multiprocessing.context._default_context.Pool  # type: ignore[attr-defined]
    multiprocessing.pool.Pool = Pool  # type: ignore[misc]
    # Managers pickle their registry when they start a server process; the
    # stdlib class it held is no longer found under its name, so register ours
    # (Manager().Pool() then serves a procpool Pool too).
    multiprocessing.managers.SyncManager.register("Pool", Pool, multiprocessing.managers.PoolProxy)


def _substitute_executor() -> None:
    import concurrent.futures
    import concurrent.futures.process

    from procpool._executor import ProcessPoolExecutor

    concurrent.futures.ProcessPoolExecutor = ProcessPoolExecutor  # type: ignore[misc]
    concurrent.futures.process.ProcessPoolExecutor = ProcessPoolExecutor  # type: ignore[misc]


def _let_scripts_inherit() -> None:
    """Make ``script_helper`` pass our environment to the scripts tests run.

    ``assert_python_ok`` runs scripts with ``-I`` (or ``-E``), which would drop
    ``PYTHONPATH`` and so the substitution. Only loaded test helpers are
    patched; this never imports the test package on its own.
    """
    helper = sys.modules.get("test.support.script_helper")
    if helper is None:
        _patch_on_import()
        return
    original = helper.run_python_until_end
    if getattr(original, "_procpool_wrapped", False):
        return

    def run_python_until_end(*args: Any, **env_vars: Any) -> Any:
        env_vars.setdefault("__isolated", False)
        for name in ("PYTHONPATH", ENV_FLAG, ENV_EXTRA_TESTS):
            if name in os.environ and not env_vars.get("__cleanenv"):
                env_vars.setdefault(name, os.environ[name])
        return original(*args, **env_vars)

    run_python_until_end._procpool_wrapped = True  # type: ignore[attr-defined]
    helper.run_python_until_end = run_python_until_end


def _patch_on_import() -> None:
    """Wrap ``script_helper`` as soon as something imports it."""
    import importlib.abc
    import importlib.machinery

    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name != "test.support.script_helper":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            loader = spec.loader
            exec_module = loader.exec_module

            def exec_and_patch(module: Any) -> None:
                exec_module(module)
                sys.meta_path[:] = [f for f in sys.meta_path if f is not hook]
                _let_scripts_inherit()

            loader.exec_module = exec_and_patch  # type: ignore[method-assign]
            return spec

    hook = _Hook()
    sys.meta_path.insert(0, hook)
