"""Every Hugging Face family with a lean spec, from a tiny config: the lean graph built from the folded HF weights
(baseline, folded at gate 0, unfused) against PyTorch: last-position prompt logits, decode logits and greedy tokens
at batch 1, greedy tokens of a ragged batch of 3; what each norm became; GroupQueryAttention per layer."""
import numpy as np
import pytest
import torch

from lean_util import prompt_ids, torch_steps
from tapernorm.compiler.export_onnx import KVCacheLM, dynamic_shapes, example_inputs, write_runtime_json
from tapernorm.compiler.hf_compile import HFDecoder
from tapernorm.compiler.lean import build_lean
from tapernorm.compiler.pipeline import ort_greedy
from tapernorm.layers import calibrate, set_gate, taperize
from tapernorm.passes import fold, materialize
from tapernorm.passes.capture import capture
from tapernorm.runtime import DecoderSession, OrtDecoder, generate_ids

V = 128
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# family -> (model_type, config overrides, norms per block incl. final norm for 1 layer)
FAMILIES = {
    "llama-gqa16": ("llama", {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                              "tie_word_embeddings": True}, 3),  # head_dim 16: rotary inside GroupQueryAttention
    "llama-mha-llama3": ("llama", {"num_key_value_heads": 4, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}, 3),
    "mistral-window": ("mistral", {"sliding_window": 4}, 3),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}, 3),
    "qwen3": ("qwen3", {"head_dim": 8}, 5),
    "olmo2": ("olmo2", {}, 5),
    "phi3": ("phi3", {}, 3),
    "gemma": ("gemma", {"head_dim": 8}, 3),
    "gemma2": ("gemma2", {"head_dim": 8, "num_hidden_layers": 2, "sliding_window": 4,
                          "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}, 9),
    "gemma3": ("gemma3_text", {"head_dim": 8, "num_hidden_layers": 2, "sliding_window": 4,
                               "layer_types": ["sliding_attention", "full_attention"]}, 13),
    "granite": ("granite", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 4.0,
                            "attention_multiplier": 0.3}, 3),
    "smollm3": ("smollm3", {"num_hidden_layers": 2, "no_rope_layers": [1, 0]}, 5),
    "gpt2": ("gpt2", {"n_positions": 64, "activation_function": "gelu_new", "num_key_value_heads": 4}, 3),
    "gpt_neox": ("gpt_neox", {"hidden_size": 128, "rotary_pct": 0.5, "hidden_act": "gelu", "num_key_value_heads": 4},
                 3),  # head_dim 32, half of it rotated inside GroupQueryAttention
}


def _model(family: str):
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    mtype, extra, _ = FAMILIES[family]
    cfg = AutoConfig.for_model(mtype, **{**BASE, **extra})
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norm gains in [0.5, 1.5] (Gemma's (1 + w): w in [-0.5, 0.5]), shifts +-0.2
        for name, p in m.named_parameters():
            if p.dim() == 1 and ("norm" in name or ".ln_" in name):
                r = torch.rand(p.shape, generator=g)
                p.copy_(r - 0.5 if "gemma" in mtype else r + 0.5) if name.endswith("weight") else p.copy_((r - 0.5) * 0.4)
        m.get_input_embeddings().weight.mul_(4.0)  # logits of a useful size: greedy tokens vary
    return m


def _build(hf, out, variants, mode):
    """Lean model.onnx (folded) / model_unfused.onnx of the HF model `hf` (tapered at gate 0 unless baseline)."""
    if mode != "baseline":
        taperize(hf, mode=mode)
        calibrate(hf, [torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))])
        set_gate(hf, 0.0)
    dec = HFDecoder(hf, mode).eval()
    wrapper = KVCacheLM(dec)
    args, ds = example_inputs(dec.config), dynamic_shapes(dec.config.n_layers)
    gm = capture(wrapper, args, dynamic_shapes=ds)
    facts = {}
    for v in variants:  # a baseline has nothing to fold: the builder reads the captured graph as it is
        g2 = gm if mode == "baseline" else (fold if v == "folded" else materialize)(
            gm, args, dynamic_shapes=ds, original=wrapper, verify=False)[0]
        facts[v] = build_lean(dec, g2, None, out / ("model.onnx" if v == "folded" else "model_unfused.onnx"),
                              torch.float32)
    write_runtime_json(out, dec.config, "float32")
    return dec, facts


def _check(dec, out, files, n_new=5):
    prompt = prompt_ids(V, 10)
    ref_toks, ref_logits = torch_steps(dec, prompt, n_new)
    scale = max(1.0, max(float(np.abs(x).max()) for x in ref_logits))
    ragged = [prompt, prompt_ids(V, 6, k=11), prompt_ids(V, 3, k=5)]
    ref_ragged = [torch_steps(dec, p, 3)[0] for p in ragged]
    for f in files:
        sess = DecoderSession(out, variant=f, provider="cpu", intra_op_threads=1)
        toks, logits = ort_greedy(sess, prompt, n_new)  # the compile's own parity loop
        diff = max(float(np.abs(a - b).max()) for a, b in zip(logits, ref_logits))
        assert diff < 1e-4 * scale, (f, diff, scale)  # prompt (step 0) and decode logits
        assert toks == ref_toks, f
        assert generate_ids(OrtDecoder(sess), ragged, max_new_tokens=3).tokens == ref_ragged, f


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_lean_parity(tmp_path, family):
    hf = _model(family)
    n_norms = FAMILIES[family][2]
    base, facts = _build(hf, tmp_path / "base", ("folded",), "baseline")
    _check(base, tmp_path / "base", ("model.onnx",))
    kinds = facts["folded"]["norms"]
    assert len(kinds) == n_norms and all(k in ("rms", "ln") for k in kinds.values()), kinds
    assert facts["folded"]["ops"]["GroupQueryAttention"] == base.config.n_layers
    tap, facts = _build(hf, tmp_path / "tap", ("folded", "unfused"), "all")
    _check(tap, tmp_path / "tap", ("model.onnx", "model_unfused.onnx"))
    assert all(k == "none" for k in facts["folded"]["norms"].values()), facts["folded"]["norms"]
    assert all(k.startswith("map_") for k in facts["unfused"]["norms"].values()), facts["unfused"]["norms"]
    st = facts["folded"]["statistics_check"]
    assert st["ok"] and st["total"] == 0, st


def test_unmapped_config_values_are_one_line():
    """A rope scaling a fixed cos/sin cache cannot express, an unknown activation: one line naming the key."""
    import transformers
    from tapernorm.compiler.lean import LeanError, SPECS
    from tapernorm.compiler.lean.hf_arch import check_config
    cfg = transformers.LlamaConfig(**{**BASE, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0,
                                                                  "factor": 2.0}})
    with pytest.raises(LeanError, match=r"^config rope_parameters\.rope_type='dynamic': .*--graph generic") as e:
        check_config(SPECS["llama"], cfg)
    assert "\n" not in str(e.value)
    cfg = transformers.LlamaConfig(**{**BASE, "hidden_act": "relu2"})
    with pytest.raises(LeanError, match=r"^config hidden_act='relu2': no lean op for this activation"):
        check_config(SPECS["llama"], cfg)
    assert check_config(SPECS["gemma"], transformers.GemmaConfig(**BASE)) == "gelu_tanh"
