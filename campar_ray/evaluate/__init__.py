"""Evaluation: metrics of every prediction source, the report with the paper's figures, and
the ablation table across runs."""

from campar_ray.evaluate.compare import compare_runs, markdown_table
from campar_ray.evaluate.metrics_table import figures_text
from campar_ray.evaluate.report import evaluate

__all__ = ["compare_runs", "evaluate", "figures_text", "markdown_table"]
