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


def parse_link_budgets(text: str) -> list[list]:
    """`--link-budget` entries: "S-D=F" (the link from node S to node D carries at most F of its dense bytes) or
    "K=F" (every link into or out of node K), separated by commas; returned as [[S, D, F], ...] with D = -1 for
    "every link of node K"."""
    entries = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        where, sep, fraction = part.partition("=")
        nodes = where.split("-")
        try:
            value = float(fraction)
            pair = [int(nodes[0]), int(nodes[1]) if len(nodes) == 2 else -1]
        except (ValueError, IndexError):
            pair, value = None, None
        if not sep or pair is None or len(nodes) > 2:
            raise DiscoError(f"expected link budgets like 0-3=0.02 (node 0 to node 3) or 3=0.02 (every link of node "
                             f"3), separated by commas; got {part!r}")
        entries.append([*pair, value])
    return entries


def link_fractions(entries, nodes: int, budget: float) -> list[list[float]]:
    """[src][dst] byte fraction each link may carry: `budget` unless an entry names the link (a pair entry wins
    over a node entry); refused when a node or fraction is out of range."""
    fractions = [[budget] * nodes for _ in range(nodes)]
    for src, dst, fraction in sorted(entries, key=lambda e: e[1] >= 0):  # node entries first, pairs override them
        if not 0 <= src < nodes or not -1 <= dst < nodes or src == dst or not 0.0 <= fraction <= 1.0:
            raise DiscoError(f"link budget {src}{'' if dst < 0 else f'-{dst}'}={fraction}: nodes must be 0..{nodes - 1}"
                             f" (two different ones) and the fraction in [0, 1]")
        links = [(src, d) for d in range(nodes)] + [(s, src) for s in range(nodes)] if dst < 0 else [(src, dst)]
        for s, d in links:
            fractions[s][d] = fraction
    return fractions
