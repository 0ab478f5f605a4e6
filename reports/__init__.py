"""reports: tables and plots generated from the MLflow runs that farm writes. Imports neither quant nor
devicelab (nor farm): MLflow is the interface, so a report can be built on any machine that reaches the
tracking store.

    from reports import sweep_report
    sweep_report("scaling-cpu", tracking_uri="sqlite:///runs/farm/mlflow.db", out_dir="runs/farm/reports/x")
"""

from .runs import TrialRun, load_trials
from .sweep_report import sweep_report

__all__ = ["TrialRun", "load_trials", "sweep_report"]
