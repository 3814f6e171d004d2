"""Loaded at start-up by every Python process under the CPython-suite runner.

Only when ``PROCPOOL_CPYTHON_SUBSTITUTE=1``: puts procpool in place of the
stdlib pools (see ``tests/cpython/_substitute.py``), so that processes the
tests start themselves see the same substitution as the test process.
"""

import os
import sys

if os.environ.get("PROCPOOL_CPYTHON_SUBSTITUTE") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import _substitute

    _substitute.install()
    del sys.path[0]
