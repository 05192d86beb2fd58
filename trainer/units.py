"""Units shared by the trainer, the evaluator and the orchestrator."""

GIB = 2**30
"""Bytes in a GiB: memory caps are given in GiB, torch and /proc count bytes."""
