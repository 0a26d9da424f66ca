"""compile_checkpoint end to end on the tiny RMS / LN models in Internal- and All-Taper: files, symbolic
dims, statistics check (report + metadata_props), parity figures; bad input (non-zero gates, bad out
dir, parity failure writes nothing); the CLI."""
import json

import onnx
import pytest
import torch

from tiny_models import make_tiny
from tapernorm.compiler import cli
from tapernorm.checkpoint import save_checkpoint
from tapernorm.compiler.export_onnx import check_io, load_onnx
from tapernorm.compiler.pipeline import CompileError, ParityError, compile_checkpoint

CASES = [("tiny", "internal"), ("tiny", "all"), ("tiny-gpt2", "internal"), ("tiny-gpt2", "all")]


def _checkpoint(path, arch, mode, gate=0.0):
    model = make_tiny(arch, mode, gate=gate)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(20)  # logits of a useful size: greedy tokens vary, ties are unlikely
    save_checkpoint(model, path)
    return model


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{m}" for a, m in CASES])
def compiled(request, tmp_path_factory):
    arch, mode = request.param
    root = tmp_path_factory.mktemp(f"{arch}-{mode}")
    _checkpoint(root / "ckpt", arch, mode)
    report = compile_checkpoint(root / "ckpt", root / "out", parity_tokens=6, graph="generic",  # lean: test_lean_*
                                unfused=True)  # model_unfused.onnx is opt-in
    return arch, mode, root, report


def test_compile_writes_contract_files(compiled):
    arch, mode, root, report = compiled
    out = root / "out"
    assert sorted(p.name for p in out.iterdir()) == ["compile_report.json", "config.json", "model.onnx",
                                                     "model_unfused.onnx", "runtime.json"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no build leftovers
    assert json.loads((out / "compile_report.json").read_text())["parity"]["ok"] is True
    rt = json.loads((out / "runtime.json").read_text())
    assert rt["n_layers"] == 2 and rt["head_dim"] == 8 and rt["dtype"] == "float32"
    cfg = make_tiny(arch, mode).config
    for f in ("model.onnx", "model_unfused.onnx"):
        m = load_onnx(out / f)
        dims = check_io(m, cfg)  # names, dtypes, symbolic batch / seq / past / total dims
        assert dims["past_key_values.0.key"][2] == "past_sequence_length"
    assert report["ir_version"] <= 13 and report["opset"]["ai.onnx"] >= 17
    assert report["providers"] == ["CPUExecutionProvider"]
    assert {"torch", "onnx", "onnxruntime", "onnxscript", "onnx_graphsurgeon"} <= set(report["versions"])
    for f in ("model.onnx", "model_unfused.onnx"):  # graphsurgeon cleanup + toposort ran on each export
        cl = report["export"][f]["cleanup"]
        assert cl["toposorted"] and cl["nodes_after"] == report["export"][f]["nodes"] <= cl["nodes_before"]


def test_fold_and_statistics_check(compiled):
    arch, mode, root, report = compiled
    n_taper = 5 if mode == "all" else 4
    assert len(report["folded_layers"]) == n_taper and report["unfolded_layers"] == []
    assert report["passes"]["fold"]["folded"] == n_taper
    assert report["passes"]["materialize"]["materialized"] == n_taper
    stats = report["statistics_check"]
    assert stats["ok"] and stats["offending"] == {}
    if mode == "all":
        assert stats["total"] == 0  # a fully norm-free graph
    else:
        assert stats["total"] >= 1  # only the final norm keeps its statistics
    m = onnx.load(str(root / "out" / "model.onnx"))
    props = {p.key: p.value for p in m.metadata_props}
    assert json.loads(props["tapernorm.statistics_check"])["ok"] is True
    assert props["tapernorm.graph"] == "folded" and props["tapernorm.dtype"] == "float32"
    assert len(m.graph.node) < len(onnx.load(str(root / "out" / "model_unfused.onnx")).graph.node)


def test_parity_figures(compiled):
    arch, mode, root, report = compiled
    p = report["parity"]
    assert p["new_tokens"] == 6 and len(p["torch_tokens"]) == 6
    for name in ("model.onnx", "model_unfused.onnx"):
        g = p["graphs"][name]
        assert g["tokens"] == p["torch_tokens"] and g["tokens_identical"]
        assert g["prompt_logits_max_abs_diff"] < 1e-3 and g["decode_logits_max_abs_diff"] < 1e-3


def test_nonzero_gates_named_and_nothing_written(tmp_path):
    _checkpoint(tmp_path / "ckpt", "tiny", "internal", gate=0.5)
    with pytest.raises(CompileError, match=r"layers\.0\.input_layernorm \(gate 0\.5\).*--allow-unfolded"):
        compile_checkpoint(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_out_dir_that_is_not_a_compile_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(CompileError, match="not a compiled model directory"):
        compile_checkpoint(tmp_path / "nockpt", tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("compiled", [CASES[0]], indirect=True, ids=["tiny-internal"])
def test_parity_failure_keeps_previous_output(compiled, tmp_path, monkeypatch):
    """A failing compile into a previous compile's directory leaves it untouched and no temp dirs."""
    arch, mode, root, report = compiled
    import shutil
    import tapernorm.compiler.parity as parity
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(parity, "PARITY_TOL", {"float32": -1.0})  # any difference now fails
    with pytest.raises(ParityError, match=r"nothing written.*model\.onnx: max \|logit diff\|"):
        compile_checkpoint(root / "ckpt", out, parity_tokens=2, graph="generic")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_compile_allow_unfolded(tmp_path, capsys):
    """`tapernorm compile --allow-unfolded` on a gate-0.5 checkpoint: norms kept, parity still exact."""
    _checkpoint(tmp_path / "ckpt", "tiny-gpt2", "internal", gate=0.5)
    assert cli.main(["compile", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 2
    assert "--allow-unfolded" in capsys.readouterr().err
    rc = cli.main(["compile", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--allow-unfolded",
                   "--parity-tokens", "3", "--graph", "generic"])  # gate 0.5: the lean graph has no op for it
    assert rc == 0
    assert "greedy tokens identical" in capsys.readouterr().out
    rep = json.loads((tmp_path / "out" / "compile_report.json").read_text())
    assert len(rep["unfolded_layers"]) == 4 and rep["folded_layers"] == []
    assert all(r["status"] == "skipped" and r["reason"] for r in rep["passes"]["fold"]["layers"].values())
    assert rep["statistics_check"]["ok"] and rep["parity"]["ok"]


def test_cli_compile_missing_checkpoint_one_line(tmp_path, capsys):
    assert cli.main(["compile", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tapernorm compile: error:") and "nope" in err and len(err.splitlines()) == 1


def test_fp16_external_data_compile_runs_in_runtime(tmp_path):
    """fp16 compile with weights forced to external data: both graphs get `.data` files, and the runtime
    decodes the compiled dir to the tokens the compile's parity check recorded."""
    from tapernorm.runtime import DecoderSession, OrtDecoder, generate_ids
    from tapernorm.compiler.parity import prompt_ids
    model = _checkpoint(tmp_path / "ckpt", "tiny", "internal")
    rep = compile_checkpoint(tmp_path / "ckpt", tmp_path / "out", dtype="float16", parity_tokens=3, inline_limit=0,
                             graph="generic", unfused=True)
    out = tmp_path / "out"
    assert (out / "model.onnx.data").is_file() and (out / "model_unfused.onnx.data").is_file()
    assert rep["export"]["model.onnx"]["external_data"] and rep["dtype"] == "float16" and rep["parity"]["ok"]
    assert json.loads((out / "runtime.json").read_text())["dtype"] == "float16"
    sess = DecoderSession(out, provider="cpu", intra_op_threads=1)
    assert sess.providers == ["CPUExecutionProvider"] and sess.np_dtype.__name__ == "float16"
    prompt = prompt_ids({}, model.config, "")
    assert generate_ids(OrtDecoder(sess), [prompt], max_new_tokens=3).tokens[0] == rep["parity"]["torch_tokens"]


def test_overflowing_dtype_and_too_many_parity_tokens_refused(tmp_path):
    model = make_tiny("tiny", "internal")
    with torch.no_grad():
        model.embed_tokens.weight.mul_(1e5)  # fine in float32, inf in float16
    save_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(CompileError, match=r"ckpt: the model's logits are not finite in float16.*--dtype float32"):
        compile_checkpoint(tmp_path / "ckpt", tmp_path / "out", dtype="float16")
    with pytest.raises(CompileError, match=r"--parity-tokens 64 does not fit .*64-token context; use at most 63"):
        compile_checkpoint(tmp_path / "ckpt", tmp_path / "out", parity_tokens=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_an_hf_directory_parity_prompt_goes_through_its_tokenizer_json(tmp_path):
    """An HF directory's parity prompt is its text through tokenizer.json (BOS by compile's rule), not the fixed
    id pattern: a real model can be ill-conditioned on ids that are no text (docs/real_checkpoints.md, 8.6)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tapernorm.compiler.parity import prompt_ids
    from tapernorm.compiler.tokenizer_files import TokenizerFiles
    vocab = {"<s>": 0, "<unk>": 1, "Once": 2, "upon": 3, "a": 4, "time": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = make_tiny("tiny", "internal").config
    files = TokenizerFiles(tokenizer="tokenizer.json", bos_id=0, add_bos=True)
    assert prompt_ids({"dir": str(tmp_path)}, cfg, "Once upon a time", files) == [0, 2, 3, 4, 5]
    files.add_bos = False
    assert prompt_ids({"dir": str(tmp_path)}, cfg, "Once upon a time", files) == [2, 3, 4, 5]
    fixed = prompt_ids({"dir": str(tmp_path)}, cfg, "Once upon a time")  # no TokenizerFiles: the fixed pattern
    assert fixed[:3] == [3, 10, 17]
