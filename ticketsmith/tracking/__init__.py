"""MLflow: the tracker, records read back, the model registry, the pyfunc model, run figures."""
