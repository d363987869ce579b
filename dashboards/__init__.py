"""Pareto-front views (PNG, self-contained HTML, CSV) logged to MLflow."""
