"""Regenerate input.jsonl: one record per documented object of the standard library.

    python examples/wordcount/make_input.py > examples/wordcount/input.jsonl

The shipped file was made with CPython 3.11; other versions give slightly
different documents, which is fine for an example.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import warnings

MODULES = """argparse ast asyncio.events asyncio.tasks base64 bisect calendar collections
configparser contextlib copy csv dataclasses datetime decimal difflib email.message enum
fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac html.parser http.client
http.cookies imaplib inspect io ipaddress itertools json logging mailbox mimetypes
multiprocessing.pool numbers operator optparse os pathlib pickle pickletools platform plistlib
poplib pprint pydoc queue random re shlex shutil smtplib socket socketserver sqlite3 statistics
string struct subprocess tarfile tempfile textwrap threading timeit tkinter.ttk tokenize
traceback turtle typing unittest.case unittest.mock urllib.parse urllib.request uuid warnings
weakref xml.dom.minidom xml.etree.ElementTree zipfile zoneinfo codecs concurrent.futures
collections.abc email.utils http.server idlelib.editor locale lzma nntplib numbers pdb selectors
symtable sysconfig telnetlib test.support typing_extensions unittest.loader xml.sax.handler
xmlrpc.client""".split()


def documents():
    seen = set()
    for name in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except ImportError:
            continue
        for qualname, obj in _members(module, name):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40 and doc not in seen:
                seen.add(doc)
                yield {"id": qualname, "text": doc}


def _members(module, name):
    yield name, module
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        yield f"{name}.{attr}", obj
        if inspect.isclass(obj):
            for meth, fn in sorted(vars(obj).items()):
                if not meth.startswith("_") and callable(fn):
                    yield f"{name}.{attr}.{meth}", fn


if __name__ == "__main__":
    for doc in documents():
        sys.stdout.write(json.dumps(doc) + "\n")
