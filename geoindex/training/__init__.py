"""Training and judging the map encoders: photo datasets, views, batches, evaluation, calibration fitting,
the encoders that ship."""
