"""Utilities every layer may use: memory meters and sizes, device and precision choice."""
