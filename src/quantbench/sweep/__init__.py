"""Sweeps: a YAML file expanded into runs that are stored, resumable and run in parallel."""
