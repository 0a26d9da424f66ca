"""onnxruntime-genai side of the peer benchmark; runs in the genai venv (no torch).

Reads one JSON command per line on stdin, answers one JSON line on stdout:
    {"cmd": "load", "name": N, "dir": D, "threads": T}          -> {"ok": true, "seconds": s}
    {"cmd": "run", "name": N, "prompt": [[ids]], "new": K}       -> {"prefill_s", "decode_s", "steps", "tokens"}
    {"cmd": "load_ours", "name": N, "dir": D, "threads": T, "max_len": L[, "spinning": false | null]}   our runtime's
        loop in this venv (spinning null: onnxruntime's default, as genai's sessions have)
    {"cmd": "quit"}
`load_ours` (tapernorm installed --no-deps in this venv) runs our own decode loop on this venv's onnxruntime, so
the benchmark can tell the loop from the onnxruntime version (genai pins its own onnxruntime).
`run` appends the (B, T) prompt (the prefill) and calls generate_next_token() K times (each call after the
first runs the model on the previous token, so K tokens cost K - 1 decode runs, as in our loop);
min_length = max_length, so an eos never ends a row early and every variant decodes the same K tokens.
"""
import json
import sys
import time

import numpy as np
import onnxruntime_genai as og

models, ours = {}, {}


def load_ours(name, path, threads, max_len, spinning=False):
    from tapernorm.runtime import DecoderSession, OrtDecoder
    t0 = time.perf_counter()
    sess = DecoderSession(path, provider="cpu", intra_op_threads=int(threads), inter_op_threads=1, spinning=spinning)
    ours[name] = OrtDecoder(sess, max_len=int(max_len))
    return {"ok": True, "seconds": time.perf_counter() - t0}


def run_ours(name, prompt, new):
    from tapernorm.runtime import greedy_block
    tokens, decode_s = greedy_block(ours[name], np.asarray(prompt, dtype=np.int64), int(new))  # (B, new)
    return {"decode_s": decode_s, "tokens": tokens.T.tolist()}  # (new, B), as before


def load(name, path, threads):
    t0 = time.perf_counter()
    cfg = og.Config(path)
    cfg.clear_providers()
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
    models[name] = og.Model(cfg)
    return {"ok": True, "seconds": time.perf_counter() - t0}


def run(name, prompt, new):
    ids = np.asarray(prompt, dtype=np.int32)
    B, T = ids.shape
    params = og.GeneratorParams(models[name])
    params.set_search_options(max_length=T + new, min_length=T + new, do_sample=False, batch_size=B)
    gen = og.Generator(models[name], params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)  # the prefill runs here; the first generate_next_token() only picks a token
    t_append = time.perf_counter() - t0
    toks, times = [], []
    for _ in range(new):
        t0 = time.perf_counter()
        gen.generate_next_token()
        times.append(time.perf_counter() - t0)
        toks.append([int(t) for t in gen.get_next_tokens()])
        if gen.is_done():
            break
    return {"prefill_s": t_append + times[0], "decode_s": sum(times[1:]), "steps": len(times) - 1,
            "step_s": times[1:], "tokens": toks}


def main():
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "quit":
                break
            if msg["cmd"] == "load":
                out = load(msg["name"], msg["dir"], msg["threads"])
            elif msg["cmd"] == "load_ours":
                out = load_ours(msg["name"], msg["dir"], msg["threads"], msg["max_len"], msg.get("spinning", False))
            elif msg["name"] in ours:
                out = run_ours(msg["name"], msg["prompt"], msg["new"])
            else:
                out = run(msg["name"], msg["prompt"], msg["new"])
        except Exception as e:  # noqa: BLE001 - report to the driver, keep serving
            out = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
