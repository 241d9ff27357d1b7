"""The index on disk and how it is built: shards, FAISS files, codecs, manifest, lazy segments."""
