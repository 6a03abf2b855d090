"""The plan of a conversion: one row per change or skip, readable as a table."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Change:
    """One row of a plan: what happens (or does not) to the module at ``path``.

    ``action`` is ``replace`` (a norm gets a new module), ``standardize`` (a conv gets Weight
    Standardization on its own), ``rewrite`` (a functional norm call inside ``path``'s forward),
    ``reparametrize`` (a weight spec such as ``wn`` changes a conv / linear in place), ``center`` (the
    parameter at ``path`` has its mean over ``dim`` subtracted: ``exact=True``), ``untie`` (the module at
    ``path`` gets its own copy of a weight it shared with a centered one), or ``skip`` (left as it is, with
    ``reason``).
    """

    path: str
    action: str
    old_type: str
    new_type: str = ""
    carried: tuple[str, ...] = ()
    convs_standardized: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    reason: str = ""
    also_at: tuple[str, ...] = ()
    shares: str = ""  # reparametrize: the layer whose parametrization this one shares (their weights are tied)
    folded: tuple[str, ...] = ()  # parameters whose value the conversion changed (Gemma's 1 + weight folded)
    dim: int | None = None  # center: the dim of the parameter whose mean is subtracted
    scale: str = ""  # center: the per-feature scale (LayerScale) its output is multiplied by: a weighted mean


@dataclass
class Plan:
    """What :func:`normswap.convert` does (or did) to a model; ``str(plan)`` is a table."""

    spec: str
    options: dict
    changes: list[Change] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def replaced(self) -> list[Change]:
        return [c for c in self.changes if c.action == "replace"]

    @property
    def skipped(self) -> list[Change]:
        return [c for c in self.changes if c.action == "skip"]

    @property
    def standardized_convs(self) -> list[str]:
        out = [p for c in self.changes for p in c.convs_standardized]
        return out + [c.path for c in self.changes if c.action == "standardize"]

    def __len__(self) -> int:
        return len([c for c in self.changes if c.action != "skip"])

    def summary(self) -> str:
        n_rewrite = len([c for c in self.changes if c.action == "rewrite"])
        n_reparam = len([c for c in self.changes if c.action == "reparametrize"])
        n_center = len([c for c in self.changes if c.action == "center"])
        weights = f"{n_reparam} weights reparametrized, " if n_reparam else ""
        centered = f"{n_center} residual-stream parameters centered, " if n_center else ""
        return (f"spec {self.spec}: {len(self.replaced)} norms replaced, {len(self.standardized_convs)} convs "
                f"standardized, {n_rewrite} functional calls rewritten, {weights}{centered}{len(self.skipped)} skipped")

    def __str__(self) -> str:
        header = ("path", "action", "old type", "new type", "carried", "convs standardized", "notes")
        rows = []
        for c in self.changes:
            notes = "; ".join(([c.reason] if c.reason else []) + list(c.warnings)
                              + ([f"also at {', '.join(c.also_at)}"] if c.also_at else []))
            rows.append((c.path, c.action, c.old_type, c.new_type, ",".join(c.carried) or "-",
                         ",".join(c.convs_standardized) or "-", notes or "-"))
        widths = [min(48, max(len(h), *(len(r[i]) for r in rows))) if rows else len(h) for i, h in enumerate(header)]
        widths[-1] = len(header[-1])

        def fmt(row: tuple[str, ...]) -> str:
            cells = [(v if len(v) <= w else v[: w - 1] + "…").ljust(w) for v, w in zip(row[:-1], widths)]
            return "  ".join(cells + [row[-1]]).rstrip()

        lines = [self.summary(), fmt(header), fmt(tuple("-" * w for w in widths))]
        lines += [fmt(r) for r in rows]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)
