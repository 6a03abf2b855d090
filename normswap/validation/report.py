"""The report of :func:`normswap.validate`: one row per check, a table as ``str()``, JSON for machines."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

STATUSES = ("pass", "fail", "skip", "info")


@dataclass
class CheckRow:
    """One check: ``status`` is ``pass``, ``fail``, ``skip`` (with the reason) or ``info`` (a measurement,
    e.g. how far a non-preserving conversion moved the outputs). ``module`` names the first offending
    module or parameter path when one is at fault."""

    check: str
    status: str
    detail: str = ""
    module: str = ""
    value: float | None = None


@dataclass
class ValidationReport:
    """Every check of one validation; ``passed`` when none failed."""

    model: str
    spec: str
    device: str
    rows: list[CheckRow] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(r.status == "fail" for r in self.rows)

    @property
    def failed(self) -> list[CheckRow]:
        return [r for r in self.rows if r.status == "fail"]

    def add(self, check: str, status: str, detail: str = "", module: str = "", value: float | None = None) -> CheckRow:
        row = CheckRow(check, status, detail, module, value)
        self.rows.append(row)
        return row

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "spec": self.spec, "device": self.device, "passed": self.passed,
                           "checks": [asdict(r) for r in self.rows]}, indent=2)

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else f"FAILED ({len(self.failed)} check(s))"
        lines = [f"validate {self.model} converted with {self.spec} on {self.device}: {verdict}"]
        header = ("check", "status", "module", "detail")
        rows = [(r.check, r.status, r.module or "-", r.detail) for r in self.rows]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header[:3])]
        widths = [min(w, 48) for w in widths]
        for row in [header, tuple("-" * w for w in widths) + ("------",), *rows]:
            cells = [(v if len(v) <= w else v[: w - 1] + "…").ljust(w) for v, w in zip(row[:3], widths)]
            lines.append("  ".join(cells + [row[3]]).rstrip())
        return "\n".join(lines)
