"""What torch.compile does with the user Triton kernels (the "Compile" question of BENCHMARKS.md):
launches.py records an op's launches and torch's analysis of what each writes (bench_kernel_analysis,
the kernel tests), probe.py counts those analyses during a compile (bench_e2e's first calls)."""
