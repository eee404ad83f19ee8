"""The program around the rooms: config, distributed setup, training loop, checkpoints, metrics."""
