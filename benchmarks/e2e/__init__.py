"""The end-to-end benchmark's parts (`python -m benchmarks.bench_e2e` is the command): models.py the
plain dense LMs, pairs.py each dense model with its SwitchHead rewrite, timing.py clocks, memory and
profiles, measures.py the measurements and the run's results, report.py the tables, verdicts and plot."""
