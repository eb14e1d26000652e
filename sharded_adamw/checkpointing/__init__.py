"""Checkpoints: sharded save and load at any world size, DCP boxes."""
