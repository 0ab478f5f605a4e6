"""farm: the command line and orchestration (sweeps on Ray, tracking in MLflow: the only MLflow writer)."""
