"""Kasmina: seed execution (slots in the host's forward pass, lifecycle, blending, isolation)."""
