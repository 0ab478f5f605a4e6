"""reports: tables and plots generated from MLflow runs. Imports neither quant nor devicelab. Not built yet."""
