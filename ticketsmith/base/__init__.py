"""The base layer: config, errors, secrets, environment, files and interrupts. No torch, no MLflow."""
