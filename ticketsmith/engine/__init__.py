"""The engine: data, models, masks, checkpoints, the run folder, training and the IMP driver.
Knows nothing of MLflow; it reports through the `Tracker` protocol (`events`)."""
