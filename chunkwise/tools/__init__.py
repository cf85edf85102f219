"""Tools: the benchmark harness and the one-shot GPU suite."""
