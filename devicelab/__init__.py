"""devicelab: benchmarks deployable artifacts on phones (ADB), Qualcomm AI Hub, or the host stand-in.

Imports neither quant, farm, Ray nor MLflow (tests/test_boundaries.py). Not built yet.
"""
