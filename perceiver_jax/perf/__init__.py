"""The performance lab: benchmarks, profiles, reference comparisons and the
malloc settings the benchmark runs with. Not used by training."""
