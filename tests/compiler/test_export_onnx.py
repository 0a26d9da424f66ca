"""ONNX export with a KV cache: contract names, symbolic dims, empty past, padding, decode steps,
IR version, fp16 + external data, bad files; and the graphsurgeon fold on the exported graphs."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tiny_models import make_tiny
from tapernorm.compiler.export_onnx import (
    KVCacheLM, check_io, empty_past_feeds, export_onnx, io_names, load_onnx, max_ir_version, save_onnx,
    write_runtime_json,
)
from tapernorm.compiler.onnx_fold import check_statistics, fold_onnx


def _session(path_or_model, optimize=True):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def rms(tmp_path_factory):
    """fp32 tiny Llama-style Internal-Taper at gate 0, exported (the unfused graph: x * s maps)."""
    model = make_tiny("tiny", "internal")
    with torch.no_grad():
        model.embed_tokens.weight.mul_(20)  # logits of a useful size, so argmax is not a tie
    path = tmp_path_factory.mktemp("rms") / "model.onnx"
    info = export_onnx(KVCacheLM(model), model.config, path, metadata={"tapernorm.graph": "test"})
    return model, path, info


@pytest.fixture(scope="module")
def ln16(tmp_path_factory):
    """fp16 tiny GPT-2-style All-Taper at gate 0, forced to external data."""
    model = make_tiny("tiny-gpt2", "all").to(torch.float16)
    path = tmp_path_factory.mktemp("ln16") / "model.onnx"
    info = export_onnx(KVCacheLM(model), model.config, path, dtype="float16", inline_limit=0)
    return model, path, info


def test_contract_names_and_symbolic_dims(rms):
    model, path, info = rms
    m = load_onnx(path)
    dims = check_io(m, model.config)
    names_in, names_out = io_names(model.config.n_layers)
    assert [i.name for i in m.graph.input] == names_in and [o.name for o in m.graph.output] == names_out
    assert names_in[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.1.value"] == ["batch_size", 4, "past_sequence_length", 8]
    assert dims["present.1.key"] == ["batch_size", 4, "total_sequence_length", 8]
    assert dims["logits"] == ["batch_size", "sequence_length", 256]
    assert m.ir_version <= max_ir_version() and info["ir_version"] == m.ir_version
    assert info["external_data"] is False and not path.with_name("model.onnx.data").exists()
    props = {p.key: p.value for p in m.metadata_props}
    assert props["tapernorm.dtype"] == "float32" and props["tapernorm.graph"] == "test"
    onnx.checker.check_model(m, full_check=True)


def test_check_io_rejects_specialized_dim(rms):
    model, path, _ = rms
    m = onnx.load(str(path))
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3  # as if export had specialized seq
    with pytest.raises(ValueError, match="symbolic"):
        check_io(m, model.config)


def test_empty_past_padding_and_decode_match_torch(rms):
    model, path, _ = rms
    cfg, s = model.config, _session(path)
    B, T = 2, 5
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0  # left padding in row 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy(),
             **empty_past_feeds(cfg, B)}
    outs = s.run(None, feeds)
    with torch.no_grad():
        ref, presents = model(ids, mask, pos, use_cache=True)
    assert np.abs(outs[0] - ref.numpy()).max() < 1e-4
    assert outs[1].shape == (B, cfg.n_heads, T, cfg.head_dim)
    # one decode step (seq 1, past 5): shapes differ from the export example (seq 3, past 4)
    nxt = ref[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    mask2 = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
    pos2 = pos[:, -1:] + 1
    past = dict(zip(io_names(cfg.n_layers)[0][3:], outs[1:]))
    outs2 = s.run(None, {"input_ids": nxt.numpy(), "attention_mask": mask2.numpy(), "position_ids": pos2.numpy(), **past})
    with torch.no_grad():
        ref2, _ = model(nxt, mask2, pos2, presents, use_cache=True)
    assert outs2[0].shape == (B, 1, cfg.vocab_size)
    assert np.abs(outs2[0] - ref2.numpy()).max() < 1e-4
    assert outs2[1].shape[2] == T + 1


def test_fp16_external_data_runs_on_ort_cpu(ln16):
    model, path, info = ln16
    assert info["external_data"] and path.with_name("model.onnx.data").is_file()
    m = load_onnx(path)
    check_io(m, model.config, "float16")
    s = _session(path)
    ids = torch.arange(6)[None] % model.config.vocab_size
    out = s.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 6), np.int64),
                             "position_ids": np.arange(6)[None], **empty_past_feeds(model.config, 1, "float16")})[0]
    assert out.dtype == np.float16
    with torch.no_grad():
        ref = model(ids).float().numpy()
    assert np.abs(out.astype(np.float32) - ref).max() < 2e-2


def test_load_onnx_bad_files(rms, tmp_path):
    _, path, _ = rms
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        load_onnx(tmp_path / "missing.onnx")
    data = path.read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="trunc.onnx.*(truncated|empty graph)"):
        load_onnx(tmp_path / "trunc.onnx")
    m = onnx.load(str(path))
    m.ir_version = max_ir_version() + 1
    save_onnx(m, tmp_path / "new.onnx")
    with pytest.raises(ValueError, match=r"new.onnx: ONNX IR version \d+ is newer than onnxruntime"):
        load_onnx(tmp_path / "new.onnx")


def test_save_onnx_is_atomic_and_leaves_no_temp(rms, tmp_path):
    _, path, _ = rms
    m = onnx.load(str(path))
    save_onnx(m, tmp_path / "a.onnx")
    save_onnx(m, tmp_path / "b" / "b.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.onnx", "b", "b.onnx", "b.onnx.data"]
    a = _session(tmp_path / "a.onnx").run(["logits"], {"input_ids": np.array([[1, 2]]), "attention_mask": np.ones((1, 2), np.int64),
                                                      "position_ids": np.array([[0, 1]]), **empty_past_feeds(rms[0].config, 1)})
    b = _session(tmp_path / "b" / "b.onnx").run(["logits"], {"input_ids": np.array([[1, 2]]), "attention_mask": np.ones((1, 2), np.int64),
                                                             "position_ids": np.array([[0, 1]]), **empty_past_feeds(rms[0].config, 1)})
    np.testing.assert_array_equal(a[0], b[0])


def test_runtime_json(rms, tmp_path):
    import json
    model = rms[0]
    write_runtime_json(tmp_path, model.config, "float16", eos_id=2, bos_id=1)
    rt = json.loads((tmp_path / "runtime.json").read_text())
    assert rt == {"n_layers": 2, "num_heads": 4, "num_kv_heads": 4, "head_dim": 8, "vocab_size": 256, "max_seq_len": 64,
                  "dtype": "float16", "eos_id": 2, "bos_id": 1}


def _decode_feeds(cfg, dtype=np.float32, B=2, T=3, P=2, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, cfg.vocab_size, (B, T)), "attention_mask": np.ones((B, P + T), np.int64),
             "position_ids": np.arange(P, P + T)[None].repeat(B, 0)}
    for n in io_names(cfg.n_layers)[0][3:]:
        feeds[n] = rng.standard_normal((B, cfg.n_heads, P, cfg.head_dim)).astype(dtype)
    return feeds


def test_graphsurgeon_fold_on_exported_rms_graph(rms):
    """The gate-0 export keeps x * s maps; the ONNX-level fold removes them with identical outputs."""
    model, path, _ = rms
    m = onnx.load(str(path))
    f, rep = fold_onnx(m)
    # 4 internal TaperNorm maps + the final RMSNorm's gain Mul (into the untied lm_head copy)
    assert rep["folded"] == 5
    feeds = _decode_feeds(model.config)
    a, b = _session(m, optimize=False).run(None, feeds), _session(f, optimize=False).run(None, feeds)
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) < 1e-4
    assert sum(n.op_type == "Mul" for n in f.graph.node) < sum(n.op_type == "Mul" for n in m.graph.node)


def test_graphsurgeon_fold_on_exported_ln_graph(ln16):
    """LN centering + shift fold on the fp16 GPT-2-style export: no ReduceMean left at all (All-Taper)."""
    model, path, _ = ln16
    m = onnx.load(str(path))
    before = check_statistics(m, ["layers.0.input_layernorm"])
    assert not before["ok"] and before["by_op"].get("ReduceMean") == 5  # centering is a mean
    f, rep = fold_onnx(m)
    assert rep["folded"] == 5 and {s["rule"] for s in rep["sites"]} == {"ln"}
    after = check_statistics(f, ["layers.0.input_layernorm", "norm"], expect_total=0)
    assert after["ok"] and after["total"] == 0
    feeds = _decode_feeds(model.config, np.float16)
    a, b = _session(m, optimize=False).run(None, feeds), _session(f, optimize=False).run(None, feeds)
    assert max(float(np.abs(x.astype(np.float32) - y).max()) for x, y in zip(a, b)) < 3e-2
