"""DecoderSession: providers actually used, thread settings, and one-line errors for bad model dirs."""
import json
import shutil
import warnings

import onnx
import pytest

from tapernorm.runtime import DecoderSession, ModelDirError, cuda_loadable


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_cpu_session_reports_providers_and_threads(compiled_dir):
    s = DecoderSession(compiled_dir, provider="cpu", intra_op_threads=1, inter_op_threads=1)
    assert s.providers == ["CPUExecutionProvider"] and s.device == "cpu"
    opts = s.session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    d = s.describe()
    assert d["providers"] == s.providers and d["n_layers"] == 2 and d["vocab_size"] == 256
    assert s.config.eos_id == 2 and s.config.max_seq_len == 64
    assert len(s.past_names) == 4 and s.past_names[0] == "past_key_values.0.key"


def test_cuda_request_reports_what_was_used(compiled_dir):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        s = DecoderSession(compiled_dir, provider="cuda", intra_op_threads=1, log_severity=4)
    assert s.providers == s.session.get_providers()
    if cuda_loadable() and s.device == "cuda":
        assert s.providers[0] == "CUDAExecutionProvider"
    else:  # no GPU here: onnxruntime-gpu falls back to CPU, and we say so
        assert s.providers == ["CPUExecutionProvider"] and s.device == "cpu"
        assert any("did not load" in str(w.message) for w in rec)


def test_auto_never_fails_without_gpu(compiled_dir):
    s = DecoderSession(compiled_dir, intra_op_threads=1, log_severity=4)
    assert s.providers[-1] == "CPUExecutionProvider"


def test_onnx_file_path_and_unfused_variant(compiled_dir):
    a = DecoderSession(compiled_dir / "model_unfused.onnx", intra_op_threads=1)
    b = DecoderSession(compiled_dir, variant="model_unfused.onnx", intra_op_threads=1)
    assert a.model_path == b.model_path and a.config == b.config


def test_not_a_compiled_dir(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        DecoderSession(tmp_path / "nope")
    assert "does not exist" in _one_line(e)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelDirError) as e:
        DecoderSession(tmp_path)
    assert "not a compiled tapernorm model" in _one_line(e) and "tapernorm compile" in str(e.value)
    with pytest.raises(ModelDirError) as e:
        DecoderSession(tmp_path / "notes.txt")
    _one_line(e)


def test_missing_variant(compiled_dir, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(compiled_dir / "model.onnx", d / "model.onnx")
    with pytest.raises(FileNotFoundError) as e:
        DecoderSession(d, variant="model_unfused.onnx")
    assert "model_unfused.onnx is missing" in _one_line(e)


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_truncated_onnx(compiled_dir, tmp_path, keep):
    data = (compiled_dir / "model.onnx").read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    (tmp_path / "model.onnx").write_bytes(data[:n])
    with pytest.raises(ModelDirError) as e:
        DecoderSession(tmp_path, log_severity=4)
    msg = _one_line(e)
    assert "model.onnx" in msg and "tapernorm compile" in msg


def test_ir_version_newer_than_runtime(compiled_dir, tmp_path):
    m = onnx.load(str(compiled_dir / "model.onnx"))
    m.ir_version = 99
    onnx.save(m, str(tmp_path / "model.onnx"))
    with pytest.raises(ModelDirError) as e:
        DecoderSession(tmp_path, log_severity=4)
    msg = _one_line(e)
    assert "IR version 99" in msg and "ir_version" in msg


def test_not_a_decoder_graph(tmp_path):
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.save(m, str(tmp_path / "model.onnx"))
    with pytest.raises(ModelDirError) as e:
        DecoderSession(tmp_path)
    assert "decoder interface" in _one_line(e)


def test_runtime_json_mismatch(compiled_dir, tmp_path):
    shutil.copy(compiled_dir / "model.onnx", tmp_path / "model.onnx")
    rt = json.loads((compiled_dir / "runtime.json").read_text())
    (tmp_path / "runtime.json").write_text(json.dumps({**rt, "num_kv_heads": 7}))
    with pytest.raises(ModelDirError) as e:
        DecoderSession(tmp_path)
    assert "num_kv_heads=7" in _one_line(e)
    legacy = {k: v for k, v in rt.items() if k not in ("num_heads", "num_kv_heads")}  # a file before explicit heads
    (tmp_path / "runtime.json").write_text(json.dumps({**legacy, "n_heads": 7}))
    with pytest.raises(ModelDirError) as e:
        DecoderSession(tmp_path)
    assert "num_kv_heads=7" in _one_line(e)
    (tmp_path / "runtime.json").write_text(json.dumps({**legacy, "n_heads": rt["num_kv_heads"]}))
    assert DecoderSession(tmp_path, intra_op_threads=1).config.num_kv_heads == rt["num_kv_heads"]
    (tmp_path / "runtime.json").write_text("{not json")
    with pytest.raises(ModelDirError) as e:
        DecoderSession(tmp_path)
    assert "runtime.json" in _one_line(e)


def test_config_inferred_without_runtime_json(compiled_dir, tmp_path):
    """Without runtime.json the shapes come from the graph and the context limit from config.json; with
    neither file the context limit is unknown, and the session refuses rather than guess (issue 11)."""
    shutil.copy(compiled_dir / "model.onnx", tmp_path / "model.onnx")
    with pytest.raises(ModelDirError, match="cannot tell the context limit"):
        DecoderSession(tmp_path, intra_op_threads=1)
    shutil.copy(compiled_dir / "config.json", tmp_path / "config.json")
    s = DecoderSession(tmp_path, intra_op_threads=1)
    assert (s.config.n_layers, s.config.num_kv_heads, s.config.head_dim, s.config.vocab_size) == (2, 4, 8, 256)
    assert s.config.max_seq_len == 64


def test_external_data_dir_runs_and_missing_data_is_named(compiled_dir, tmp_path):
    """A compiled dir whose weights live in model.onnx.data (the >2 GB layout) decodes like the inline one;
    without its .data file the error names that file."""
    from tapernorm.compiler.export_onnx import save_onnx
    from tapernorm.runtime import OrtDecoder, generate_ids
    for f in ("runtime.json", "config.json"):
        shutil.copy(compiled_dir / f, tmp_path / f)
    save_onnx(onnx.load(str(compiled_dir / "model.onnx")), tmp_path / "model.onnx", external_data=True)
    assert (tmp_path / "model.onnx.data").stat().st_size > 100_000  # the weight matrices moved out
    prompts = [[1, 5, 6, 7]]
    a = generate_ids(OrtDecoder(DecoderSession(tmp_path, provider="cpu", intra_op_threads=1)), prompts, max_new_tokens=8)
    b = generate_ids(OrtDecoder(DecoderSession(compiled_dir, provider="cpu", intra_op_threads=1)), prompts, max_new_tokens=8)
    assert a.tokens == b.tokens
    (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(ModelDirError) as e:
        DecoderSession(tmp_path, log_severity=4)
    assert "model.onnx.data" in _one_line(e) and "external weights" in str(e.value)
