"""Measurement: everything `ripe bench` and `ripe retrieval-bench` run, apart from the product.

- `compare`: `ripe bench`, the native engine against llama.cpp on one GGUF (prefill, decode, load, peak
  RSS), each run in a fresh `speed_worker` process; `--batch`, `--kv` and `--chat` run `engine_worker`.
- `draft`: `ripe bench --draft`, the speculative proposers' costs, acceptance and predicted against
  measured speedup (`spec_worker` processes).
- `retrieval`: `ripe retrieval-bench`, retrieval quality (`retrieval_eval`) and shortlist speed at scale
  (`retrieval_scale`).
"""
