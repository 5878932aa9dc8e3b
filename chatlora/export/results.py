"""What an export leaves and reports: the manifest's name, the parity table's rows."""

from __future__ import annotations

from dataclasses import dataclass

MANIFEST = "chatlora-export.json"


@dataclass
class Check:
    """One row of the parity table: ``status`` is ``PASS``, ``FAIL`` or ``SKIP`` (with the reason in ``detail``)."""

    name: str
    status: str
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


def format_checks(checks: list[Check]) -> str:
    """The parity table as text, one row per check."""
    width = max([len(c.name) for c in checks] + [5])
    lines = [f"{'check'.ljust(width)}  result  detail", f"{'-' * width}  ------  {'-' * 40}"]
    lines += [f"{c.name.ljust(width)}  {c.status.ljust(6)}  {c.detail}" for c in checks]
    return "\n".join(lines)


def _first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"first difference at character {i}: training {a[i : i + 24]!r} vs export {b[i : i + 24]!r}"
