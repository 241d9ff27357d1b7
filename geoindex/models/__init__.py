"""Encoders: the registry, families, runtimes and preprocessing, and tiles -> embeddings."""
