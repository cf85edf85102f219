"""`transformers.Trainer` and TRL trainers that train chunk-wise."""
