"""fold_onnx_file on foreign ONNX: tiny HF GPT-2 (Conv1D -> Reshape -> Gemm), Llama and Qwen3 (per-head QK-norms,
folded backwards) taperized All-Taper at gate 0, exported by torch.onnx (dynamo) with the gate-0 maps as ops;
the fold leaves no norm site and no normalization statistic, and onnxruntime agrees with the original file and
with PyTorch."""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from tapernorm import calibrate, set_gate, taperize  # noqa: E402
from tapernorm.compiler.export_onnx import quiet_export  # noqa: E402
from tapernorm.compiler.onnx_fold import fold_onnx_file  # noqa: E402

VOCAB = 128


def _model(kind):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    else:
        cls = transformers.LlamaConfig if kind == "llama" else transformers.Qwen3Config
        cfg = cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    names = taperize(model, "all")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random gains and shifts: a dropped or misplaced scale shows
        for n, m in model.named_modules():
            if n in names:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if hasattr(m, "bias"):
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
    batches = [torch.randint(0, VOCAB, (2, 8), generator=g) for _ in range(2)]
    calibrate(model, batches, forward=lambda m, b: m(b))
    set_gate(model, 0.0)
    return model.eval(), len(names)


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


@pytest.mark.parametrize("kind,backward", [("gpt2", 0), ("llama", 0), ("qwen3", 2)])
def test_fold_exported_hf_model(tmp_path, kind, backward):
    import onnxruntime as ort
    model, n_norms = _model(kind)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    src = tmp_path / "model.onnx"
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    with quiet_export():
        torch.onnx.export(_Logits(model), (ids,), str(src), input_names=["input_ids"], output_names=["logits"],
                          dynamic_shapes=(dims,), dynamo=True, external_data=False)
    report = fold_onnx_file(src, tmp_path / "folded.onnx")
    assert report["folded"] == n_norms and report["refused"] == [], report["refused"]
    assert sum(s["direction"] == "backward" for s in report["sites"]) == backward
    assert report["verify"]["ok"] and report["verify"]["max_abs_diff"] < 1e-4
    assert report["stat_ops_after"] == 0  # (GPT-2's gelu_new keeps its x ** 3 Pow: not a statistic)
    modules = sorted(s["module"] for s in report["sites"])  # named from the exporter's metadata
    want = {"gpt2": ["transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.ln_f"],
            "llama": ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.norm"]}
    if kind in want:
        assert len(modules) == 3 and all(m.endswith(w) for m, w in zip(modules, want[kind])), modules
    # the other constant Muls (attention scale, GELU's constants, RoPE) are listed apart, none from a norm
    others = [o["module"] for o in report["other_muls"]["kept"]]
    assert others and not any("norm" in m or ".ln_" in m for m in others), others
    sess = ort.InferenceSession(str(tmp_path / "folded.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        want = model(ids).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
