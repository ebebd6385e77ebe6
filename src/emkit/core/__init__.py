"""Layer 0: errors, paths, config machinery, the run folder, row files, JSONL, endpoints, statistics."""
