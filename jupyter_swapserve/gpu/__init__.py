"""GPU layer: device discovery and memory (monitor), CUDA checkpoint/restore (checkpoint)."""
