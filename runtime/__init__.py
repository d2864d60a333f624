"""Inference runtime: forward, KV cache, sampling, generation, tokenizer, chat templates, engines."""
