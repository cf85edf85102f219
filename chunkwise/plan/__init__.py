"""The memory model, from configs alone: model shapes, the traced layer, per-method memory, what fits."""
