"""The data names a user gives (`--data synthetic`, `--packing`), apart from the readers: the command line checks them
before torch is imported (`chunkwise.data.synthetic` and `chunkwise.data.sequences` re-export them)."""

SYNTHETIC = "synthetic"
"""The `--data` value (and the default without `--data`) that selects `RecallTask`."""
PAIR_DEPTHS = ("start", "random")
"""Where `RecallTask` states its key→value pairs: right after <bos> (the demo), or at a uniformly random depth in
the filler, drawn per sequence (the fact anywhere in the document; the question still at the end)."""
PACKING_MODES = ("documents", "concat", "truncate")
"""How documents become rows: several whole documents per row kept apart (positions restart, per-document
attention), concatenated into one stream (cross-document attention), or one (truncated) row per document."""
DEPRECATED_PACKING = {"pack": "concat"}
"""`pack` was the concatenation's name before documents were kept apart; it still means "concat"."""


def canonical_packing(packing: str) -> str:
    """The packing mode `packing` names: a deprecated alias (`pack`) becomes its mode, anything else is returned as is."""
    return DEPRECATED_PACKING.get(packing, packing)
