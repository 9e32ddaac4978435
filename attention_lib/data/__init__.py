"""Recorded benchmark sweeps (CSV with provenance), read by :mod:`attention_lib.results`."""
