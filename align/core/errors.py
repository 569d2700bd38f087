"""Errors caused by user input: the CLI prints them without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (file, config field, data row): the message says where and what was expected."""


class TrainingDiverged(UserError):
    """A loss, gradient, KL or trained tensor turned non-finite or exploded; the run stops before
    anything from that step is saved, so its newest verified checkpoint is what --resume loads."""
