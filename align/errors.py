"""Errors caused by user input: the CLI prints them without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (file, config field, data row): the message says where and what was expected."""


class TrainingDiverged(UserError):
    """A loss or KL turned non-finite or exploded; the last good checkpoint is intact."""
