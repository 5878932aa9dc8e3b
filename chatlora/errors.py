"""User errors: what a person can fix (bad data, flag, file, model), as opposed to a bug in chatlora.

Every error a user can cause subclasses :class:`ChatloraError`; ``chatlora.cli.main`` turns exactly those into exit
code 2 and one line per problem on stderr. Anything else (a plain ``ValueError``, ``KeyError``, ...) is a bug and keeps
its traceback. The types keep their older bases (``ValueError``, ``RuntimeError``) so existing ``except`` clauses
still catch them, and their old homes (``chatlora.data.DataError``, ``chatlora.config.ConfigError``, ...) still
import them.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "MAX_SHOWN_PROBLEMS",
    "ChatloraError",
    "CliError",
    "ConfigError",
    "DataError",
    "FileError",
    "ModelError",
    "TemplateError",
]

MAX_SHOWN_PROBLEMS = 50  # problems shown by str(DataError); all are kept in .problems


class ChatloraError(Exception):
    """Base of every user error; ``lines()`` is what the command line prints for it."""

    def lines(self) -> list[str]:
        return [f"chatlora: error: {self}"]


class CliError(ChatloraError):
    """A flag or flag combination is invalid."""


class ConfigError(ChatloraError, ValueError):
    """A config file, flag or setting is invalid; the message names the key."""


class FileError(ChatloraError, ValueError):
    """A file or folder named by the user cannot be used as asked; the message names it and says what to do."""


class TemplateError(ChatloraError, ValueError):
    """The chat template cannot be split into prompt and reply spans."""


class ModelError(ChatloraError, RuntimeError):
    """The model cannot be found, converted or adapted; the message says what to do."""


class DataError(ChatloraError):
    """Raised with every problem found in a dataset; ``str(e)`` is the problems joined by newlines.

    Attributes:
        problems: All problems, each ``"PATH:LINE: what is wrong: what was expected"`` (``"PATH: ..."`` when the file
            cannot be read). ``str(e)`` shows the first 50 and then ``"... and N more problems"``.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(self.problems)

    @classmethod
    def at(cls, path: str | Path, problems: list[tuple[int, str]]) -> DataError:
        """The error for ``(line, problem)`` pairs of one file, sorted by line: ``"PATH:LINE: problem"`` each."""
        ordered = sorted(problems, key=lambda item: item[0])  # stable: keeps order within a line
        return cls([f"{path}:{line}: {message}" for line, message in ordered])

    def __str__(self) -> str:
        shown = self.problems[:MAX_SHOWN_PROBLEMS]
        extra = len(self.problems) - len(shown)
        if extra > 0:
            shown = [*shown, f"... and {extra} more problems"]
        return "\n".join(shown)

    def lines(self) -> list[str]:
        return list(self.problems)  # each already names its file and line
