"""Benchmarks: one question per script, each printing a table against its baseline measured in the same
run. Run them from the repository root as modules, e.g. `python -m benchmarks.bench_kernels`;
`benchmarks.common` holds what they share. Current numbers and their commands: BENCHMARKS.md."""
