"""compile_checkpoint's default lean graph: files (genai_config.json), report (graph, ORT node counts, parity),
the one-line refusal of a model the lean builder cannot express and --fallback-generic, the CLI flags."""
import json

import pytest

from lean_util import lean_model
from tapernorm.checkpoint import save_checkpoint
from tapernorm.compiler import cli
from tapernorm.compiler.pipeline import CompileError, compile_checkpoint


@pytest.fixture(scope="module")
def lean_compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("lean")
    save_checkpoint(lean_model("tiny", "internal", 2), root / "ckpt")
    return root, compile_checkpoint(root / "ckpt", root / "out", parity_tokens=5, unfused=True)  # opt-in


def test_default_compile_is_lean_with_genai_config(lean_compiled):
    root, rep = lean_compiled
    out = root / "out"
    assert rep["graph"] == "lean" and rep["parity"]["ok"]
    for g in rep["parity"]["graphs"].values():
        assert g["tokens_identical"] and g["prompt_logits_max_abs_diff"] < 1e-3 * rep["parity"]["logit_scale"]
    assert {"model.onnx", "model_unfused.onnx", "genai_config.json", "runtime.json"} <= {p.name for p in out.iterdir()}
    opt = rep["ort_optimized"]
    assert opt["model.onnx"]["ops"]["GroupQueryAttention"] == 2 and opt["model.onnx"]["nodes"] < opt[
        "model_unfused.onnx"]["nodes"]
    assert rep["export"]["model.onnx"]["norms"]["layers.0.input_layernorm"] == "none"
    assert rep["export"]["model_unfused.onnx"]["norms"]["layers.0.input_layernorm"] == "map_rms"
    assert rep["statistics_check"]["ok"] and rep["statistics_check"]["total"] == 1  # the kept final norm
    conf = json.loads((out / "genai_config.json").read_text())
    assert conf["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert conf["search"]["past_present_share_buffer"] is True and conf["model"]["context_length"] == 64


def test_unexpressible_model_is_one_line_unless_fallback(tmp_path, capsys):
    save_checkpoint(lean_model("tiny-gpt2", "internal", 2, gate=0.5), tmp_path / "ckpt")
    with pytest.raises(CompileError, match=r"lean graph: layers\.0\.input_layernorm: TaperLayerNorm is not at gate 0"):
        compile_checkpoint(tmp_path / "ckpt", tmp_path / "out", allow_unfolded=True, parity_tokens=2)
    assert not (tmp_path / "out").exists()
    rc = cli.main(["compile", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--allow-unfolded",
                   "--parity-tokens", "2", "--fallback-generic"])
    assert rc == 0 and "graph generic" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "compile_report.json").read_text())["graph"] == "generic"
    assert not (tmp_path / "out" / "genai_config.json").exists()


def test_graph_flag_validated():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["compile", "ckpt", "--out", "o", "--graph", "fast"])
    with pytest.raises(CompileError, match="graph 'fast' is not one of"):
        compile_checkpoint("ckpt", "o", graph="fast")


def test_lean_external_data_decodes_like_inline(lean_compiled, tmp_path):
    from tapernorm.runtime import DecoderSession, OrtDecoder, generate_ids
    root, rep = lean_compiled
    rep2 = compile_checkpoint(root / "ckpt", tmp_path / "out", parity_tokens=3, inline_limit=0)
    assert rep2["export"]["model.onnx"]["external_data"] and (tmp_path / "out" / "model.onnx.data").is_file()
    toks = [generate_ids(OrtDecoder(DecoderSession(d, provider="cpu", intra_op_threads=1)), [[1, 5, 9, 4]],
                         max_new_tokens=6).tokens for d in (root / "out", tmp_path / "out")]
    assert toks[0] == toks[1]
