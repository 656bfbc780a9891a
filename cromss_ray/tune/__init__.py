"""Ray Tune sweeps of CromSS pretraining: one Ray Train run and one MLflow child run per trial."""
