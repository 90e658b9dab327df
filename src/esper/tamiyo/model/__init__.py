"""Tamiyo's model: the graph view of a run, the policies that read it, and the checkpoint format.

Simic trains what this package defines, so it imports nothing of Tamiyo's runtime or records.
"""
