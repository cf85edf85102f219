"""The torch-free name lists the command line checks against agree with the classes behind them."""

from chunkwise.attention import chunk
from chunkwise.attention.names import ATTENTION_CHOICES
from chunkwise.core.names import OBJECTIVE_NAMES, SAMPLING_POLICIES
from chunkwise.core.objectives import OBJECTIVES
from chunkwise.core.sampling import SAMPLERS
from chunkwise.models import presets
from chunkwise.models.names import TINY_PRESETS


def test_names_match_what_they_name():
    assert SAMPLING_POLICIES == tuple(SAMPLERS)
    assert OBJECTIVE_NAMES == tuple(OBJECTIVES)
    assert chunk.ATTENTION_CHOICES is ATTENTION_CHOICES
    for preset in TINY_PRESETS:
        presets.tiny_config(preset)  # each name builds
