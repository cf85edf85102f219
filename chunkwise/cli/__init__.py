"""`chunkwise train | eval | export | verify | plan | bench` (`eval --task passkey|needle` runs the probes)."""

from chunkwise.cli.main import main

__all__ = ["main"]
