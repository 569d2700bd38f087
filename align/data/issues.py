"""What a bad row is: its place, the field and what was expected; and the error listing them all."""

from __future__ import annotations

from dataclasses import dataclass

from align.core.errors import UserError


@dataclass
class DataIssue:
    where: str
    field: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.where}: field '{self.field}': {self.message}" if self.field else f"{self.where}: {self.message}"


class DataError(UserError):
    """One or more bad rows (or a bad file); `issues` lists them all."""

    def __init__(self, issues: list[DataIssue], limit: int = 20):
        self.issues = issues
        shown = "\n  ".join(str(i) for i in issues[:limit])
        more = f"\n  ... and {len(issues) - limit} more" if len(issues) > limit else ""
        head = f"{len(issues)} bad row(s):\n  " if len(issues) > 1 else ""
        super().__init__(f"{head}{shown}{more}")


def collect_rows(records, validate) -> tuple[list, list[DataIssue], bool]:
    """Validate each `(where, record)` -> (good rows, every issue, whether there was any record).

    A record may already be a DataIssue (unreadable line); `validate(record, where)` returns
    (row or None, its issues). Every bad row is listed, not just the first.
    """
    rows, issues, seen_any = [], [], False
    for where, record in records:
        seen_any = True
        if isinstance(record, DataIssue):
            issues.append(record)
            continue
        row, row_issues = validate(record, where)
        issues.extend(row_issues)
        if row is not None:
            rows.append(row)
    return rows, issues, seen_any


def bad_rows(issues: list[DataIssue]) -> int:
    """How many rows `issues` name (a row may have several)."""
    return len({i.where for i in issues})


def skipped_report(name: str, issues: list[DataIssue], total: int, shown: int = 5) -> str:
    """What `on_bad_rows: skip` dropped, for the console: the count, then the first few reasons."""
    first = f"; the first {shown}:" if len(issues) > shown else ":"
    return "\n  ".join([f"{name}: skipped {bad_rows(issues)} of {total} rows (on_bad_rows: skip){first}"]
                       + [str(i) for i in issues[:shown]])


class TooManyBadRows(DataError):
    """More than `max_bad_fraction` of a source's rows are bad: skipping them would train on what is left."""

    def __init__(self, name: str, issues: list[DataIssue], total: int, max_bad_fraction: float, shown: int = 5):
        self.issues = issues
        bad = bad_rows(issues)
        head = (f"{name}: {bad} of {total} rows are bad ({bad / total:.0%}), more than max_bad_fraction="
                f"{max_bad_fraction:g}; fix them or raise max_bad_fraction. The first {min(shown, len(issues))}:")
        UserError.__init__(self, "\n  ".join([head] + [str(i) for i in issues[:shown]]))


def check_bad_fraction(name: str, issues: list[DataIssue], total: int, max_bad_fraction: float | None) -> None:
    """Raise TooManyBadRows when more than `max_bad_fraction` of `total` rows are bad (None: no limit)."""
    if max_bad_fraction is not None and total and bad_rows(issues) / total > max_bad_fraction:
        raise TooManyBadRows(name, issues, total, max_bad_fraction)
