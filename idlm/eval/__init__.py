"""Evaluation: the introspective acceptance rate α (SPEC §7) and, later, task accuracy and loss."""
