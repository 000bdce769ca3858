"""Development tooling: the embedded stack, synthetic catalog, report, demo and benchmarks."""
