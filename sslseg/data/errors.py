"""Errors raised by the data layer and the did-you-mean helper they share."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DataError(ValueError):
    """A data file, folder or list is missing, malformed or inconsistent.

    The message always names the file (or folder) and the problem.
    """


class DataValidationError(DataError):
    """``CaseDataset.validate`` found one or more problems.

    Attributes:
        problems: every problem found, as ``(file, message)`` pairs, in the order found.
    """

    def __init__(self, problems: list[tuple[str, str]], header: str = "") -> None:
        self.problems = list(problems)
        lines = [f"  {path}: {msg}" for path, msg in self.problems]
        head = header or f"data validation found {len(self.problems)} problem(s)"
        super().__init__(head + ":\n" + "\n".join(lines))


def did_you_mean(name: str, choices: Iterable[str], what: str) -> str:
    """Build ``unknown <what> 'x'; did you mean 'y'? Available: ...`` for an unknown name."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    shown = ", ".join(repr(c) for c in choices[:20])
    more = f", ... ({len(choices)} in all)" if len(choices) > 20 else ""
    return f"unknown {what} {name!r}{hint} Available: {shown}{more}"


def check_choice(argument: str, value: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a did-you-mean ``ValueError``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(did_you_mean(str(value), choices, f"{argument}"))
    return value
