"""Hyperparameter search: spaces, Optuna studies, the ask/tell loop and reports."""
