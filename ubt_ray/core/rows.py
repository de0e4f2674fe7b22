"""Row accounting: every row that goes in comes out or is rejected with a counted reason."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_EXAMPLES_PER_REASON = 20


@dataclass
class RowCounts:
    """Rows in = rows out + rows rejected, with the rejection reasons counted and a few example keys kept."""
    rows_in: int = 0
    rows_out: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    def reject(self, reason: str, key: str, n: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES_PER_REASON:
            ex.append(key)

    def merge(self, other: "RowCounts") -> None:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        for reason, n in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: MAX_EXAMPLES_PER_REASON - len(ex)])

    def check(self, what: str) -> None:
        """Fail loudly if rows were lost: the accounting invariant is part of the product."""
        if self.rows_in != self.rows_out + self.rows_rejected:
            raise RuntimeError(f"{what}: rows in ({self.rows_in}) != rows out ({self.rows_out}) + rows rejected "
                               f"({self.rows_rejected}); this is a bug in ubt_ray, please report it.")

    def to_dict(self) -> dict:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "rows_rejected": self.rows_rejected,
                "rejected_by_reason": dict(sorted(self.rejected.items())),
                "rejected_examples": {k: v for k, v in sorted(self.examples.items())}}
