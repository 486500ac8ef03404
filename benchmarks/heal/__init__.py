"""bench_heal's parts (`python -m benchmarks.bench_heal` is the command): data.py the standard-library
text, models.py the pretrained models, pruning.py the pruned-heads baselines."""
