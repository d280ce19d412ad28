"""Which budgets a run may nest (torch-free: option checks and `--help` read it)."""
from __future__ import annotations

from disco.errors import DiscoError


def check_nested(budgets: tuple[float, ...], final: float) -> tuple[float, ...]:
    """The nested budgets, largest first, ending with `final` (the run's budget); refused unless each is in
    (final, 1] and they differ."""
    larger = tuple(sorted(set(budgets), reverse=True))
    if len(larger) != len(budgets) or any(not final < b <= 1.0 for b in larger):
        raise DiscoError(f"nested budgets must differ and each lie above the budget ({final}) and at most 1, got "
                         f"{', '.join(str(b) for b in budgets)}")
    return larger + (final,)
