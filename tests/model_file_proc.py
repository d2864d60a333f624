"""A process that holds a native and a llama.cpp engine open on one model file, driven line by line on
stdin (tests/test_model_file_changes.py). It runs in its own process because a fault on a mapped file
(SIGBUS) would kill whatever runs the engines.

Commands, one per line; each answer is one line on stdout:
  native | llama.cpp          one short greedy request through the engine's own path (checks included):
                              `ok <token ids>` or `error <ExceptionName>: <message>`
  native-direct | llama.cpp-direct
                              the same request straight to the engine underneath, past the check, to
                              show that no weight still reads the file: `ok <token ids>` (or a crash)
  alive                       `alive`
EOF on stdin ends the process with status 0.
"""

from __future__ import annotations

import sys

from ripelm.models.errors import RipelmError
from ripelm.runtime.backend import GenerationStats, stream
from ripelm.runtime.engines import open_backend
from ripelm.runtime.sampling import SamplingParams

PROMPT_IDS = [1, 504, 3458, 282, 4649, 314]
PARAMS = SamplingParams(temperature=0.0, max_tokens=6)


def main(path: str) -> int:
    engines = {
        "native": open_backend(path, engine="native", device="cpu", n_ctx=256, kv_memory=8 << 20),
        "llama.cpp": open_backend(path, engine="llama.cpp", n_ctx=256, threads=1),
    }
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "alive":
            print("alive", flush=True)
        elif cmd in engines:
            try:
                ids = [
                    ev.token_id for ev in stream(engines[cmd], PROMPT_IDS, PARAMS) if ev.token_id is not None
                ]
                print("ok", *ids, flush=True)
            except RipelmError as e:
                print(f"error {type(e).__name__}: {e}", flush=True)
        elif cmd == "native-direct":
            req = engines["native"].engine.submit(PROMPT_IDS, PARAMS)
            print("ok", *list(engines["native"].request_ids(req, GenerationStats())), flush=True)
        elif cmd == "llama.cpp-direct":
            llm = engines["llama.cpp"].llm
            llm.reset()
            gen = llm.generate(PROMPT_IDS, temp=0.0, top_k=1, reset=True)
            print("ok", *[next(gen) for _ in range(PARAMS.max_tokens)], flush=True)
        else:
            print(f"unknown command {cmd!r}", flush=True)
    for backend in engines.values():
        backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
