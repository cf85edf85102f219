"""`BatchStream`: the run's micro-batches in a fixed order, a pure function of (seed, micro-batch index)."""

from __future__ import annotations

import torch

from chunkwise.data.preferences import PreferencePair, collate_pairs
from chunkwise.data.sequences import collate
from chunkwise.data.synthetic import synthetic_task_for
from chunkwise.recipes.train.config import TrainConfig


class BatchStream:
    """Micro-batch number `index` → a collated batch; a pure function of (seed, index), so resume needs only the index."""

    def __init__(self, config: TrainConfig, sequences: list | None, pad: int, vocab_size: int):
        self.config = config
        self.task = synthetic_task_for(vocab_size, config.pair_depth) if sequences is None else None
        self.sequences, self.pad = sequences, pad
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.sequences) if self.sequences is not None else 0

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        size = self.config.batch_size
        if self.task is not None:
            return self.task.batch(index, batch_size=size, seq_len=self.config.seq_len, seed=self.config.seed)
        # Sequence positions index*size ... run through epochs, each a seeded shuffle of the data.
        rows = [self.sequences[self._position(p)] for p in range(index * size, (index + 1) * size)]
        if isinstance(rows[0], PreferencePair):  # batch_size pairs: the chosen rows, then the rejected ones
            return collate_pairs(rows, pad_token_id=self.pad)
        return collate(rows, pad_token_id=self.pad)

    def _position(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.sequences))
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.config.seed * 7919 + epoch)
            self._orders = {epoch: torch.randperm(len(self.sequences), generator=generator).tolist()}
        return self._orders[epoch][offset]
