"""Compile at scale (issue 17) on tiny models: a bf16 checkpoint compiles to an fp32 graph and says so, the unfused
graph is opt-in, one progress line per stage, per-stage seconds and peak RSS in the report, a model that would not
fit is refused before loading (nothing in --out), and memory-mapped loading shares the tensors a fold leaves alone."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tapernorm  # noqa: E402
from tapernorm.compiler import cli  # noqa: E402
from tapernorm.compiler.load import (MEMORY_ENV, CompileFitError, checkpoint_dtype,  # noqa: E402
                                     estimate_compile_bytes, load_hf_mmap, mmap_safetensors)
from tapernorm.compiler.pipeline import compile_checkpoint  # noqa: E402
from tapernorm.checkpoint import read_safetensors_layout  # noqa: E402

STAGES = {"check", "load", "check-finite", "capture", "fold", "build", "files", "parity", "finish"}


def _tapered_llama(dtype=torch.bfloat16):
    """A tiny grouped-query HF Llama, Internal-Taper at gate 0, in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    tapernorm.taperize(model, "internal")
    g = torch.Generator().manual_seed(0)
    tapernorm.calibrate(model, [torch.randint(0, 96, (2, 12), generator=g) for _ in range(2)],
                        forward=lambda m, b: m(input_ids=b, use_cache=False))
    tapernorm.set_gate(model, 0.0)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return tapernorm.save_pretrained(_tapered_llama(), tmp_path_factory.mktemp("bf16") / "ckpt")


@pytest.fixture(scope="module")
def compiled(bf16_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "c"
    lines = []
    rep = compile_checkpoint(bf16_dir, out, parity_tokens=3, log=lines.append)
    return out, rep, lines


def test_bf16_checkpoint_compiles_to_fp32_and_the_report_says_so(bf16_dir, compiled):
    out, rep, _ = compiled
    assert checkpoint_dtype(bf16_dir) == "bfloat16"
    assert rep["checkpoint_dtype"] == "bfloat16" and rep["compute_dtype"] == "float32" and rep["dtype"] == "float32"
    assert rep["parity"]["ok"] and rep["parity"]["graphs"]["model.onnx"]["tokens_identical"]
    import onnx
    m = onnx.load(str(out / "model.onnx"))
    assert {i.data_type for i in m.graph.initializer if i.dims and len(i.dims) == 2} == {onnx.TensorProto.FLOAT}


def test_unfused_graph_is_opt_in(compiled, bf16_dir, tmp_path):
    out, rep, _ = compiled
    assert not (out / "model_unfused.onnx").exists() and rep["unfused"] is False
    assert list(rep["parity"]["graphs"]) == ["model.onnx"] and "model_unfused.onnx" not in rep["export"]
    assert cli.main(["compile", str(bf16_dir), "--out", str(tmp_path / "u"), "--parity-tokens", "2", "--unfused"]) == 0
    rep2 = json.loads((tmp_path / "u" / "compile_report.json").read_text())
    assert (tmp_path / "u" / "model_unfused.onnx").is_file() and rep2["unfused"] is True
    assert set(rep2["parity"]["graphs"]) == {"model.onnx", "model_unfused.onnx"}
    assert "materialize" in {s["name"] for s in rep2["stages"]}


def test_one_progress_line_per_stage_and_the_report_records_them(compiled):
    _, rep, lines = compiled
    names = [s["name"] for s in rep["stages"]]
    assert set(names) == STAGES and len(names) == len(STAGES)
    for s in rep["stages"]:
        assert s["seconds"] >= 0 and s["peak_rss_bytes"] > 10 * 2**20
        assert sum(1 for ln in lines if ln.startswith(f"{s['name']}: ") and " s, peak RSS " in ln) == 1
    assert rep["peak_rss_bytes"] >= max(s["peak_rss_bytes"] for s in rep["stages"])
    assert rep["total_seconds"] >= sum(s["seconds"] for s in rep["stages"]) - 0.5


def test_a_model_that_will_not_fit_is_refused_before_loading(bf16_dir, tmp_path, monkeypatch, capsys):
    est = estimate_compile_bytes(bf16_dir, "float32")
    monkeypatch.setenv(MEMORY_ENV, str(est.peak_bytes - 1))
    out = tmp_path / "c"
    with pytest.raises(CompileFitError, match=r"needs about .* GiB .* only .* available .*--dtype float16.*more "):
        compile_checkpoint(bf16_dir, out)
    assert not out.exists() or not any(out.iterdir())
    assert cli.main(["compile", str(bf16_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Nothing was loaded or written" in err  # one line, no traceback
    monkeypatch.setenv(MEMORY_ENV, "64G")
    assert estimate_compile_bytes(bf16_dir, "float16").peak_bytes < est.peak_bytes


def test_mmap_loading_shares_the_tensors_a_fold_leaves_alone(tmp_path):
    """fp32 checkpoint, fp32 compute: the loaded parameters view the file's map, and after the fold the linears it
    did not change (o_proj, down_proj) are still those very tensors; the folded ones are new."""
    from tapernorm.compiler.export_onnx import KVCacheLM, dynamic_shapes, example_inputs
    from tapernorm.compiler.hf_compile import HFDecoder
    from tapernorm.passes import fold
    d = tapernorm.save_pretrained(_tapered_llama(torch.float32), tmp_path / "ckpt")
    head, start = read_safetensors_layout(d / "tapernorm.safetensors")
    model = load_hf_mmap(d, "tapered")
    params = dict(model.named_parameters())
    base = params["model.embed_tokens.weight"].data_ptr() - start - head["model.embed_tokens.weight"]["data_offsets"][0]
    for k, p in params.items():  # each parameter sits at its file offset in one mapping: views, not copies
        if p.numel() > 64:
            assert p.data_ptr() - base == start + head[k]["data_offsets"][0], k
    assert len(mmap_safetensors(d / "tapernorm.safetensors")) == len(head)
    wrapper = KVCacheLM(HFDecoder(model, "internal"))
    cfg = wrapper.model.config
    args = example_inputs(cfg)
    gm, _ = fold(wrapper, args, dynamic_shapes=dynamic_shapes(cfg.n_layers))
    ptrs = {t.data_ptr() for t in list(gm.parameters()) + list(gm.buffers())}
    o = model.model.layers[0].self_attn.o_proj.weight
    q = model.model.layers[0].self_attn.q_proj.weight
    assert o.data_ptr() in ptrs  # unchanged by the fold: shared, still the file's map
    assert q.data_ptr() not in ptrs  # folded: a new tensor W * s
