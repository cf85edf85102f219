"""The data names a user gives (`--data synthetic`, `--packing`), apart from the readers: the command line checks them
before torch is imported (`chunkwise.data.synthetic` and `chunkwise.data.sequences` re-export them)."""

SYNTHETIC = "synthetic"
"""The `--data` value (and the default without `--data`) that selects `RecallTask`."""
PACKING_MODES = ("pack", "truncate")
"""How documents become rows: packed into `--seq-len` blocks, or one (truncated) row per document."""
