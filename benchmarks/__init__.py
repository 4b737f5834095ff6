"""Benchmarks: minidask against dask.distributed, on the same machine.

``python -m benchmarks`` (or ``make bench``) runs every case in
``cases.py`` once against each engine, on the same cluster shape, and
prints a table of the two results side by side; the same table goes to
``benchmarks/results/latest.json`` together with facts about the machine
and its load average before and after the run. ``--quick`` runs tiny
sizes, to check that everything works rather than to measure it.

The parts: ``engines`` (the two implementations of one API), ``tasks``
(the functions the workers run), ``cases`` (what is measured), ``machine``
(what it was measured on), ``report`` (the table and the JSON) and
``runner`` (running each case against each engine).
"""
