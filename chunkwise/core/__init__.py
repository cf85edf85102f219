"""The algorithm: the engines (stage 1, stage 2), the cache, batches, losses and objectives, chunk sampling,
reference log-probs, gradient sync across ranks, chunked inference. Imports nothing above `attention/` and `utils/`."""
