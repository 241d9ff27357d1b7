"""Answering a query: the level kinds, the beam search, priors, calibrated results."""
