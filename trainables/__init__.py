"""What one trial runs, and the library under it (no Ray or MLflow below ``pipeline.py``)."""
