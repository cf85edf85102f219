"""Data: files -> documents -> token rows (packing), the synthetic task, preference pairs, probes."""
