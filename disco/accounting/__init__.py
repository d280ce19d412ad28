from disco.accounting.report import cost_report

__all__ = ["cost_report"]
