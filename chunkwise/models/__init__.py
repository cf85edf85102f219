"""Models: tiny presets and benchmark shapes built from configs, and loading (presets, folders, hub ids, LoRA)."""
