"""Benchmarks of respmotion; ``python -m bench`` runs them all and prints one JSON document."""
