"""The work that runs on a worker: one trial (trial), the shared stages trials need (stages) and one
device job (device_job: export, compile, bench). Nothing here talks to MLflow or schedules anything.
Imports farm.plan and farm.core below it."""
