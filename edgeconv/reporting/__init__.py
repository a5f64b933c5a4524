"""Reports from bench.py's results.json files: markdown tables and PNG plots (`edgeconv report`)."""

from edgeconv.reporting.report import ReportResult, report
from edgeconv.reporting.results import BenchResult, load_results

__all__ = ["BenchResult", "ReportResult", "load_results", "report"]
