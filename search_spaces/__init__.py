"""YAML search spaces for the sweep, and their validation."""
