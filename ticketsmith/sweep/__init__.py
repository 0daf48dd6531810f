"""Optuna sweeps over pruning schedules: config, study, and their MLflow runs."""
