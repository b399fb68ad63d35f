"""Speed of the Python references on fixed token ids, for `lockstep bench`.

Each function loads the model once, then times a prefill of `prompt_ids` on an empty
cache (median of `repeats` runs) and `n_decode` single-token decode steps after it,
each picking the next token by argmax as the engine's greedy loop does. Times are wall
clock (time.perf_counter) around the library calls only.
"""

from __future__ import annotations

import statistics
import time


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def llamacpp(model_path: str, threads: int, prompt_ids: list[int], n_decode: int, repeats: int) -> dict:
    import llama_cpp
    import numpy as np

    n_ctx = len(prompt_ids) + n_decode + 8
    # n_batch = n_ctx: without logits_all, llama-cpp-python keeps n_batch rows of scores
    # and writes row n_tokens-1, so it must cover every position.
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def prefill():
        llm.reset()  # n_tokens = 0; eval() then drops every cached cell from position 0
        llm.eval(prompt_ids)

    prefill_s = _median_time(prefill, repeats)
    prefill()
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode_s = time.perf_counter() - t0
    return {"name": "llama.cpp", "version": llama_cpp.__version__, "prefill_s": prefill_s,
            "decode_s": decode_s, "threads": threads}


def transformers(model_path: str, threads: int, prompt_ids: list[int], n_decode: int, repeats: int) -> dict:
    import os

    import torch
    import transformers as tf

    torch.set_num_threads(threads)
    if os.path.isdir(model_path):
        model = tf.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(os.path.dirname(model_path),
                                                        gguf_file=os.path.basename(model_path),
                                                        dtype=torch.float32)
    model.eval()
    ids = torch.tensor([prompt_ids])

    def prefill():
        with torch.no_grad():
            return model(ids, use_cache=True)

    prefill_s = _median_time(prefill, repeats)
    with torch.no_grad():
        out = prefill()
        past = out.past_key_values
        tok = out.logits[0, -1].argmax().view(1, 1)
        t0 = time.perf_counter()
        for _ in range(n_decode):
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[0, -1].argmax().view(1, 1)
        decode_s = time.perf_counter() - t0
    return {"name": "transformers", "version": tf.__version__, "prefill_s": prefill_s,
            "decode_s": decode_s, "threads": threads}
