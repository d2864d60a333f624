"""GGUF reading and validation, architecture configs, the model catalog and store."""
