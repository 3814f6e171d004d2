"""The benchmark harness behind ``benchmarks/run.py``.

- ``cli``: the command line; plans the runs and writes the report.
- ``runner``: parent side; one fresh subprocess per contender x workload case, time limit,
  memory guard, process-group kill.
- ``child``: the subprocess; runs one case and records it as JSON lines.
- ``workloads``: W1-W8 and the throughput curve; ``sizes``: their sizes per mode.
- ``contenders``: procpool and each peer behind one small ``Session`` interface.
- ``tasks``: the functions the workers run; ``measure``: clocks, RSS, budgets.
- ``report``: the markdown tables; ``plot``: the PNG; ``envsetup``: benchmarks/.venv.

The parent uses the standard library only; the libraries are imported in the subprocesses.
"""
