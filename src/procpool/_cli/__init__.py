"""``procpool run``: batch jobs over data files that survive crashes.

Modules, in the order data flows through them:

* ``_args``: the command line and ``--help``.
* ``_target``: TARGET (``module:function`` or ``file.py:function``), checked
  in the parent before any work, imported by name in each worker.
* ``_inputs``: JSONL / CSV / lines readers; a bad line becomes an error row.
* ``_task``: runs in the workers: seeds, tags output, calls the function,
  encodes the output line, times itself.
* ``_journal``: the SQLite journal, the truth about what is done.
* ``_output``: the output file, written only from committed journal rows and
  repaired from the journal on ``--resume``.
* ``_summary``: counters and the end-of-run summary.
* ``_run``: the parent's loop tying them together (data-flow diagram there).

Why output and journal cannot disagree: a record's output line is stored in
the journal, and the output file is appended to only after the rows are
committed. At any kill point the file is therefore a prefix of the journal's
rows (perhaps with a torn last line); ``--resume`` compares the two, cuts the
file where they part, and writes the rest from the journal. Records are never
redone if committed, never written twice (one row per index, by a UNIQUE
constraint), and never lost (a record not committed is simply run again).

This package uses only procpool's public API, and ``_task`` (imported by every
worker) stays free of heavy imports.
"""
