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
