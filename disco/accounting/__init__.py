"""Exact per-image costs of a partitioned model (`cost_report`), and their types (`costs.py`: torch-free, so a
deployment's manifest reads its costs without importing torch through this package)."""
from __future__ import annotations

__all__ = ["cost_report"]


def __getattr__(name: str):
    if name == "cost_report":
        from disco.accounting.report import cost_report

        return cost_report
    raise AttributeError(f"module 'disco.accounting' has no attribute {name!r}")
