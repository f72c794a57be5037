"""The demo's verdict: each call's expected and observed outcome, before and after the lockdown.

Pure: :func:`render` turns rows into the table the demo prints, :func:`mismatches` says which
rows disagree (one line each, for a person), and the demo's exit status follows from it.
"""

from __future__ import annotations

import dataclasses
import enum


class Verdict(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


@dataclasses.dataclass(frozen=True)
class Observation:
    """What one real call did: ``verdict`` None when it could not be told (an error that is
    neither an answer nor a refusal); ``detail`` what the caller saw; ``rule`` the rule the
    serving proxy counted the decision under, when it counted exactly one."""

    verdict: Verdict | None
    detail: str
    rule: str | None = None


@dataclasses.dataclass(frozen=True)
class Row:
    call: str
    before_expected: Verdict
    before: Observation
    after_expected: Verdict
    after: Observation

    @property
    def matches(self) -> bool:
        """Both outcomes as expected, each decided by a rule the serving proxy counted (a
        refusal no rule counted came from somewhere else)."""
        return (
            self.before.verdict == self.before_expected
            and self.after.verdict == self.after_expected
            and self.before.rule is not None
            and self.after.rule is not None
        )


FOOTNOTE = (
    "observed: the caller's answer through the real proxies; rule: what the serving proxy's "
    "authorization metrics counted for that very call (srv/authz labels)"
)


def _outcome(observation: Observation) -> str:
    verdict = observation.verdict.value if observation.verdict else "???"
    return f"{verdict} ({observation.detail})"


def render(rows: list[Row]) -> str:
    """The table, one line per call, then a footnote saying where the outcomes come from."""
    header = (
        "CALL",
        "BEFORE: EXPECTED",
        "OBSERVED",
        "AFTER: EXPECTED",
        "OBSERVED",
        "DECIDING RULE (AFTER)",
        "",
    )
    lines = [
        (
            row.call,
            row.before_expected.value,
            _outcome(row.before),
            row.after_expected.value,
            _outcome(row.after),
            row.after.rule or "-",
            "ok" if row.matches else "MISMATCH",
        )
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    rule = "  ".join("-" * width for width in widths)
    before_rules = sorted({row.before.rule for row in rows if row.before.rule})
    notes = [f"before the lockdown, calls were decided by: {', '.join(before_rules) or '-'}"]
    return "\n".join(
        [line(header).rstrip(), rule, *(line(c).rstrip() for c in lines), *notes, FOOTNOTE]
    )


def mismatches(rows: list[Row]) -> list[str]:
    """One line per disagreement: which call, when, what was expected and what happened."""
    found = []
    for row in rows:
        for when, expected, seen in (
            ("before", row.before_expected, row.before),
            ("after", row.after_expected, row.after),
        ):
            if seen.verdict != expected:
                found.append(
                    f"MISMATCH: {row.call} {when} the lockdown: expected {expected.value}, "
                    f"observed {_outcome(seen)}"
                )
            elif seen.rule is None:
                found.append(
                    f"MISMATCH: {row.call} {when} the lockdown: {_outcome(seen)}, but the "
                    "serving proxy counted no decision for it"
                )
    return found


def exit_status(rows: list[Row]) -> int:
    """0 when every row matches, 1 otherwise (and with no rows: nothing was shown)."""
    return 0 if rows and not mismatches(rows) else 1
