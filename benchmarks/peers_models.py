"""The peer benchmark's models: one set of random weights, compiled every way the benchmark compares.

- `taper`: an All-Taper DecoderLM at gate 0 (calibrated, then each map rescaled to unit output RMS on random
  tokens so the norm-free random model stays finite); compiled lean (model.onnx folded, model_unfused.onnx)
  and generic (the dynamo export, folded);
- `baseline`: the same linear / embedding weights with plain RMSNorms (gains from the taper model's gamma);
  compiled lean (fused SkipSimplifiedLayerNormalization);
- `hf`: an HF LlamaForCausalLM computing the taper model's function exactly: each gate-0 map x * s is an HF
  RMSNorm with eps 2^60 and weight s * 2^30 (in fp32, rsqrt(mean(x^2) + 2^60) is exactly 2^-30 while
  mean(x^2) < 2^36), saved with a word-level tokenizer so onnxruntime-genai's model builder accepts it;
  `genai_builder_graph` runs that builder (from the main venv: it needs torch, onnx, onnx-ir, transformers).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from tapernorm import build_model, calibrate, set_gate
from tapernorm.checkpoint import save_checkpoint
from tapernorm.compiler.pipeline import compile_checkpoint
from tapernorm.passes.fold_math import taper_map

__all__ = ["make_models", "compile_all", "hf_llama", "genai_builder_graph", "weight_bytes_per_step"]

HF_EPS = 2.0 ** 60
HF_GAIN = 2.0 ** 30


def make_models(width: int, depth: int, heads: int, vocab: int, max_seq: int, seed: int):
    """(baseline, All-Taper at gate 0): same linear and embedding weights, random, eval mode."""
    torch.manual_seed(seed)
    taper = build_model("w128", dim=width, n_layers=depth, n_heads=heads, vocab_size=vocab, max_seq_len=max_seq,
                        taper_mode="all")
    with torch.no_grad():
        for n, p in taper.named_parameters():
            if n.endswith("norm.weight") or n.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(seed)
    calibrate(taper, [torch.randint(0, vocab, (2, 64), generator=g) for _ in range(3)])
    set_gate(taper, 0.0)
    _unit_rms_maps(taper, torch.randint(0, vocab, (2, 64), generator=g))
    base = build_model(taper.config.__class__(**{**taper.config.to_dict(), "taper_mode": "baseline"}))
    sd = {k: v for k, v in taper.state_dict().items() if k in base.state_dict()}
    base.load_state_dict(sd, strict=True)  # linears, embeddings and the norms' gamma
    return base.eval(), taper.eval()


@torch.no_grad()
def _unit_rms_maps(taper, ids) -> None:
    """Rescale each gate-0 map's c, in forward order, so its output x * c * gamma_t has about unit RMS on `ids`.

    With random weights the calibrated c (taken at gate 1) lets the norm-free residual stream grow layer after
    layer; at width 512 the logits overflow. Trained models do not need this; the benchmark's random ones do."""
    from tapernorm.layers import taper_layers
    for name, layer in taper_layers(taper):
        seen = {}
        def grab(m, a, out, seen=seen):
            seen.setdefault("rms", out.pow(2).mean().sqrt())  # returns None: the output is left as it is
        hook = layer.register_forward_hook(grab)
        taper(ids)
        hook.remove()
        layer.c.div_(seen["rms"].clamp_min(1e-6))


def compile_all(width: int, args, cache: Path, log=print) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    """Compile (cached by settings) -> ({variant: onnx path}, baseline model, taper model)."""
    key = f"w{width}-d{args.depth}-hd{args.head_dim}-v{args.vocab}-s{args.seed}-m{args.max_seq}-u2"
    d = cache / key
    base, taper = make_models(width, args.depth, width // args.head_dim, args.vocab, args.max_seq, args.seed)
    paths = {"lean_folded": d / "taper" / "model.onnx", "lean_unfused": d / "taper" / "model_unfused.onnx",
             "lean_baseline": d / "baseline" / "model.onnx", "generic_folded": d / "generic" / "model.onnx"}
    for ck, model in (("taper_ckpt", taper), ("base_ckpt", base)):
        if not (d / ck / "config.json").is_file():
            save_checkpoint(model, d / ck)
    for out, ck, graph in (("taper", "taper_ckpt", "lean"), ("baseline", "base_ckpt", "lean"),
                           ("generic", "taper_ckpt", "generic")):
        if not (d / out / "compile_report.json").is_file():
            t0 = time.perf_counter()
            compile_checkpoint(d / ck, d / out, parity_tokens=4, graph=graph, unfused=out == "taper")
            log(f"[bench] compiled w{width} {out} ({graph}) in {time.perf_counter() - t0:.0f} s")
    return paths, base, taper


def hf_llama(taper, out: Path) -> float:
    """Save the HF Llama twin of the All-Taper `taper` model (+ tokenizer) to `out`; returns max |logit diff|."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    c = taper.config
    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
                     num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads,
                     max_position_embeddings=c.max_seq_len, rms_norm_eps=HF_EPS, rope_theta=c.rope_theta,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                     attention_bias=False, mlp_bias=False)
    hf = LlamaForCausalLM(hc).eval()
    sd = {k: v for k, v in taper.state_dict().items()}
    new = {}
    for k in hf.state_dict():
        if k.endswith("norm.weight"):
            name = k[len("model."):-len(".weight")]
            new[k] = (taper_map(taper.get_submodule(name))[0] * HF_GAIN).float()
        elif k == "lm_head.weight":
            new[k] = sd["embed_tokens.weight"]
        else:
            new[k] = sd[k[len("model."):]]
    hf.load_state_dict(new, strict=True)
    ids = torch.randint(0, c.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = float((hf(ids).logits - taper(ids)).abs().max())
    hf.save_pretrained(out)
    vocab = {f"t{i}": i for i in range(c.vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t1", eos_token="t2", unk_token="t0",
                            pad_token="t2").save_pretrained(out)
    (out / "tapernorm_twin.json").write_text(json.dumps({"max_abs_logit_diff_vs_tapernorm": diff}))
    return diff


def genai_builder_graph(hf_dir: Path, out: Path, builder_py: Path, log=print) -> Path:
    """Run onnxruntime-genai's model builder (fp32, cpu) on `hf_dir` into `out` (cached); returns `out`."""
    if (out / "genai_config.json").is_file():
        return out
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(builder_py), "-i", str(hf_dir), "-o", str(out), "-p", "fp32",
                           "-e", "cpu"], capture_output=True, text=True, cwd=str(builder_py.parent))
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        raise RuntimeError(f"onnxruntime-genai's builder failed on {hf_dir}: {proc.stderr.strip()[-500:]}")
    log(f"[bench] genai builder graph in {time.perf_counter() - t0:.0f} s -> {out}")
    return out


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: every linear (lm_head included), not the embedding table."""
    seen, total = set(), 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight.data_ptr() not in seen:
            seen.add(mod.weight.data_ptr())
            total += mod.weight.numel() * 4 + (mod.bias.numel() * 4 if mod.bias is not None else 0)
    return total
