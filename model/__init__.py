"""Tensors only: encoder, projection head, losses, LARS parameter groups and schedules."""
