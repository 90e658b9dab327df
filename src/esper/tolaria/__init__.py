"""Tolaria: the trainer (data, optimizer, steps, checkpoints, rollback, emergency halt)."""
