"""The sweep driver: CLI, Ray Tune + Optuna tuner construction, MLflow logging, Pareto front, resume and release."""
