"""Ray wiring: the only package that imports ray (Ray Data datasets, Ray Train trainers)."""
