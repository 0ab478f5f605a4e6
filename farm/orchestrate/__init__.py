"""The driver: a running sweep (sweep), trials and device jobs on Ray (scheduler, device_tasks), MLflow
(tracking, the only writer, and device_metrics, the device form of a run), the progress line, the
nightly regression run (nightly, regression) and the data folder's garbage collection (gc). Imports
farm.work, farm.plan and farm.core below it; never farm.cli."""
