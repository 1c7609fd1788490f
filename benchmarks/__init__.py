"""Benchmarks (not tests): throughput and timing figures, written to results/bench/."""
