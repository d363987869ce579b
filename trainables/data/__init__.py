"""Landmark datasets: Oxford5k/Paris6k (original and revisited layouts), the embedded synthetic set, tuples, download."""
