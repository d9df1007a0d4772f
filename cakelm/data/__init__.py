"""Data: raw-text sources (registry packages and local files) and pretraining token shards."""
