"""Offline jobs that orchestrate geoindex: fetch_tiles, build_index, demo (each `python -m pipelines.<job>`)."""
