"""`chunkwise train | eval | verify | plan | bench | probe`."""

from chunkwise.cli.main import main

__all__ = ["main"]
