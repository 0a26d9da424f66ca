"""Which Hugging Face families `tapernorm compile` takes end to end (a coverage survey, not a speed benchmark).

For each family: a tiny model from a config (2 layers, width 32, vocab 256; random weights, norm gains randomised),
taperize (internal), calibrate on random tokens, gate 0, tapernorm.save_pretrained with a SentencePiece
tokenizer, then compile_checkpoint (folded + unfused ONNX with a KV cache, parity over 4 greedy tokens).
Records per family: TaperNorms, norms folded, graph (lean for every family with a spec in compiler/lean/families.py,
else generic with the one-line reason), ORT node count of model.onnx after optimization,
parity figures, statistic ops left, seconds or the one-line error.

    .venv/bin/python benchmarks/hf_families.py [--only llama,gpt2]   -> results/hf_compile_families.{json,md}
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_output_args, library_versions, loadavg, machine_info, output_dir, write_results  # noqa: E402

V = 256


def configs() -> dict:
    """{family: zero-argument config factory}, tiny and seeded."""
    import transformers as tf
    c = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return {
        "llama": lambda: tf.LlamaConfig(**c, tie_word_embeddings=True),
        "llama-mha": lambda: tf.LlamaConfig(**{**c, "num_key_value_heads": 4}, tie_word_embeddings=True),
        "mistral": lambda: tf.MistralConfig(**c, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**c, tie_word_embeddings=True),
        "phi3": lambda: tf.Phi3Config(**c, pad_token_id=0),
        "qwen3": lambda: tf.Qwen3Config(**c, head_dim=8),
        "gemma": lambda: tf.GemmaConfig(**c, head_dim=8),
        "gemma2": lambda: tf.Gemma2Config(**c, head_dim=8),
        "gemma3": lambda: tf.Gemma3TextConfig(**c, head_dim=8, sliding_window=16,
                                              layer_types=["sliding_attention", "full_attention"]),
        "granite": lambda: tf.GraniteConfig(**c, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0),
        "smollm3": lambda: tf.SmolLM3Config(**c, no_rope_layers=[1, 0], pad_token_id=0),
        "olmo2": lambda: tf.Olmo2Config(**c),
        "stablelm": lambda: tf.StableLmConfig(**c),
        "gpt2": lambda: tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                                      eos_token_id=2),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**{k: v for k, v in c.items() if k not in ("num_key_value_heads",
                                                                                        "hidden_size")},
                                             hidden_size=128, rotary_pct=0.5),
        "opt": lambda: tf.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2),
        "falcon": lambda: tf.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          bos_token_id=1, eos_token_id=2),
    }


def tokenizer_dir(root: Path) -> Path:
    """A 256-piece SentencePiece tokenizer.model + tokenizer_config.json on the builtin corpus."""
    from tapernorm.data import builtin_corpus, train_tokenizer
    from tapernorm.hf_config import sp_tokenizer_info
    d = root / "tok"
    d.mkdir()
    train_tokenizer(builtin_corpus()[:60], V, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps(sp_tokenizer_info(d / "tokenizer.model", 128)[1]))
    return d


def one(family: str, factory, root: Path, tok: Path) -> dict:
    """Taperize, save, compile one family; the row of the table."""
    import transformers as tf
    import tapernorm
    from tapernorm.compiler.pipeline import compile_checkpoint
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(factory()).eval()
        g = torch.Generator().manual_seed(0)
        tapered = tapernorm.taperize(model, "internal")
        with torch.no_grad():
            for _, m in tapernorm.taper_layers(model):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.weight_t.copy_(m.weight)
        batches = [torch.randint(3, V, (2, 12), generator=g) for _ in range(3)]
        tapernorm.calibrate(model, batches, forward=lambda mm, b: mm(input_ids=b, use_cache=False))
        tapernorm.set_gate(model, 0.0)
        d = tapernorm.save_pretrained(model, root / family, tokenizer_from=tok)
        rep = compile_checkpoint(d, root / f"{family}-compiled", parity_tokens=4)
        gr = rep["parity"]["graphs"]
        return {"family": family, "class": type(model).__name__, "ok": True, "tapered": len(tapered),
                "folded": len(rep["folded_layers"]), "graph": rep["graph"],
                "prompt_diff": max(x["prompt_logits_max_abs_diff"] for x in gr.values()),
                "tokens_identical": all(x["tokens_identical"] for x in gr.values()),
                "stat_ops_left": rep["statistics_check"]["total"], "why_generic": (rep["hf"] or {}).get("lean"),
                "ort_nodes": rep["ort_optimized"]["model.onnx"]["nodes"],
                "seconds": round(time.perf_counter() - t0, 1)}
    except Exception as e:  # noqa: BLE001 - the survey records every failure as one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return {"family": family, "ok": False, "error": f"{type(e).__name__}: {first}",
                "seconds": round(time.perf_counter() - t0, 1)}


def markdown(res: dict) -> str:
    """The results table."""
    lines = ["# tapernorm compile on Hugging Face families (tiny models, Internal-Taper, gate 0)", "",
             f"transformers {res['versions'].get('transformers')}, torch {res['versions'].get('torch')}, "
             f"onnxruntime {res['versions'].get('onnxruntime')}; {res['machine']['cpu']}, load {res['loadavg_end']}",
             "", "| family | TaperNorms | folded | graph | ORT nodes | max prompt-logit diff | greedy tokens | "
             "statistic ops left | s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        if r["ok"]:
            graph = r["graph"] + (f" ({r['why_generic']})" if r.get("why_generic") else "")
            lines.append(f"| {r['family']} | {r['tapered']} | {r['folded']} | {graph} | {r['ort_nodes']} | "
                         f"{r['prompt_diff']:.1e} | "
                         f"{'identical' if r['tokens_identical'] else 'DIFFER'} | {r['stat_ops_left']} | {r['seconds']} |")
        else:
            lines.append(f"| {r['family']} | | | | | {r['error']} | | | {r['seconds']} |")
    lines += ["", "Folded < TaperNorms: those maps stay as explicit `x * s` nodes (the fold report says why); "
              "parity holds either way. Statistic ops left include the kept final norm (Internal-Taper)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run the survey; write results/hf_compile_families.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated families (default: all)")
    add_output_args(ap)  # hf_compile_families.{json,md}: scratch directory by default, benchmarks/results/ with --save
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    import transformers
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    fams = configs()
    pick = a.only.split(",") if a.only else list(fams)
    res = {"machine": machine_info(), "versions": library_versions(("torch", "onnxruntime", "onnx", "transformers")),
           "rows": []}
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        tok = tokenizer_dir(root)
        for f in pick:
            res["rows"].append(one(f, fams[f], root, tok))
            print(json.dumps(res["rows"][-1]), flush=True)
    res["loadavg_end"] = loadavg()
    js, md = write_results(output_dir(a) / "hf_compile_families", res, markdown(res))
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
