"""compile --precision (issue 16): weight-only MatMulNBits int4/int8 after an fp32 fold, the fp16 lean graph,
parity against the fp32 model, the one-line refusals, and the quantized layout read back exactly."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lean_util import lean_model
from tapernorm.checkpoint import save_checkpoint
from tapernorm.compiler import cli
from tapernorm.compiler.pipeline import compile_checkpoint
from tapernorm.compiler.precision import PrecisionError, plan_precision
from tapernorm.compiler.quantize import QuantizeError, QuantSpec, dequantize_nbits, quantize_model

ROOT = Path(__file__).resolve().parents[2]


def _matmul_model(k: int, n: int, seed: int = 0, name: str = "layers.0.mlp.down_proj") -> onnx.ModelProto:
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name=name)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_layout_is_what_onnxruntime_computes(bits):
    model = _matmul_model(64, 24)
    w = numpy_helper.to_array(model.graph.initializer[0])
    q, rep = quantize_model(model, QuantSpec(bits=bits, block_size=32, accuracy_level=None))
    node = next(n for n in q.graph.node if n.op_type == "MatMulNBits")
    assert rep.quantized == ["layers.0.mlp.down_proj"] and rep.weight_bytes_after < rep.weight_bytes_before
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    kernel = sess.run(None, {"x": np.eye(64, dtype=np.float32)})[0]  # (K, N): the weight the kernel uses
    deq = dequantize_nbits(q, node)
    assert np.abs(deq - kernel).max() < 1e-5
    rel = np.linalg.norm(deq - w) / np.linalg.norm(w)
    assert 0 < rel < (0.15 if bits == 4 else 0.01)


def test_block_size_must_divide_k_and_be_supported():
    with pytest.raises(QuantizeError, match=r"^layers\.0\.mlp\.down_proj: block size 32 does not divide its input "
                                            r"width K=48; pick --block-size from \[16\]"):
        quantize_model(_matmul_model(48, 8), QuantSpec(bits=4, block_size=32))
    with pytest.raises(QuantizeError, match="block size 24 is not one MatMulNBits supports"):
        quantize_model(_matmul_model(48, 8), QuantSpec(bits=4, block_size=24))


def test_plan_refusals_are_one_line():
    with pytest.raises(PrecisionError, match=r"cannot run on provider cpu: .*no bfloat16 kernels.*pick --precision "
                                             r"fp16 .* or --provider cuda"):
        plan_precision("bf16", provider="cpu")
    with pytest.raises(PrecisionError, match="leave --dtype at float32"):
        plan_precision("int4", dtype="float16")
    assert plan_precision("int4", provider="cpu").quant.accuracy_level == 4  # genai's CPU default
    assert plan_precision("int4", provider="cuda").quant.accuracy_level is None
    assert plan_precision("bf16", provider="cuda").graph_dtype == "bfloat16"  # written; CUDA parity untested here


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    save_checkpoint(lean_model("tiny", "all", 2), root / "ckpt")
    rep = compile_checkpoint(root / "ckpt", root / "out", precision="int4", block_size=16, parity_tokens=4)
    return root, rep


def test_int4_compile_quantizes_folded_weights_with_parity(int4_dir):
    root, rep = int4_dir
    out = root / "out"
    prec = rep["precision"]
    assert prec["name"] == "int4" and prec["fold_dtype"] == "float32"
    files = prec["files"]["model.onnx"]
    assert "lm_head" in files["quantized"] and files["block_size"] == 16 and files["accuracy_level"] == 4
    m = onnx.load(out / "model.onnx")
    ops = {n.op_type for n in m.graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops and "GroupQueryAttention" in ops
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["tapernorm.precision"] == "int4" and meta["tapernorm.graph_kind"] == "lean"
    par = rep["parity"]
    assert par["ok"] and par["precision"] == "int4" and par["prompts"] == 4
    for g in par["graphs"].values():
        assert g["greedy_agreement"] >= par["agreement_floor"] and g["prompt_logits_max_abs_diff"] <= par["tolerance"]
    assert json.loads((out / "runtime.json").read_text())["dtype"] == "float32"
    assert (out / "genai_config.json").is_file()


def test_int4_dir_decodes_with_our_loop_and_genai(int4_dir):
    """--engine genai on the quantized directory: genai's venv (its own onnxruntime) gives our loop's tokens."""
    from tapernorm.runtime import DecoderSession, OrtDecoder, generate_ids
    root, _ = int4_dir
    prompts = [[1, 5, 9, 4], [1, 40, 41, 42]]
    ours = generate_ids(OrtDecoder(DecoderSession(root / "out", provider="cpu", intra_op_threads=1)), prompts,
                        max_new_tokens=5).tokens
    genai_py = next((p for p in (os.environ.get("TAPERNORM_GENAI_PYTHON"), str(ROOT / ".venv-genai/bin/python"))
                     if p and Path(p).is_file()), None)
    if genai_py is None:
        pytest.skip("no onnxruntime-genai venv (set TAPERNORM_GENAI_PYTHON or create .venv-genai)")
    script = ("import json, sys\nfrom tapernorm.runtime.genai_engine import GenaiEngine\n"
              "print(json.dumps(GenaiEngine(sys.argv[1], threads=1).generate_ids(json.loads(sys.argv[2]), "
              "max_new_tokens=5).tokens))")
    proc = subprocess.run([genai_py, "-c", script, str(root / "out"), json.dumps(prompts)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ours


def test_block_size_error_names_layer_through_the_cli(int4_dir, tmp_path, capsys):
    root, _ = int4_dir
    rc = cli.main(["compile", str(root / "ckpt"), "--out", str(tmp_path / "o"), "--precision", "int8",
                   "--block-size", "64", "--parity-tokens", "2"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("[compile]")]
    assert rc == 2 and len(err) == 1 and "layers.0.self_attn.qkv_proj: block size 64 does not divide" in err[0]
    assert not (tmp_path / "o").exists()


def test_fp16_lean_graph_from_fp32_fold(tmp_path):
    save_checkpoint(lean_model("tiny", "internal", 2), tmp_path / "ckpt")
    rep = compile_checkpoint(tmp_path / "ckpt", tmp_path / "out", precision="fp16", parity_tokens=4)
    assert rep["dtype"] == "float16" and rep["precision"]["fold_dtype"] == "float32" and rep["parity"]["ok"]
    m = onnx.load(tmp_path / "out" / "model.onnx")
    assert m.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert json.loads((tmp_path / "out" / "runtime.json").read_text())["dtype"] == "float16"


def test_precision_benchmark_helpers_on_a_tiny_lean_pair(tmp_path):
    """benchmarks/precision_eval.py: all-position logits of a lean graph, perplexity, the per-linear int4 error."""
    import sys
    from lean_util import build_lean_dir
    from tapernorm.compiler.quantize import quantize_file
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from precision_eval import all_position_logits, matched_linears, perplexity, step_weight_bytes
    build_lean_dir(lean_model("tiny", "all", 2), tmp_path / "f32")
    (tmp_path / "q4").mkdir()
    for f in ("model.onnx", "model_unfused.onnx"):
        quantize_file(tmp_path / "f32" / f, tmp_path / "q4" / f, QuantSpec(bits=4, block_size=16))
    ids = [(7 * i + 3) % 256 for i in range(40)]
    ref: dict = {}
    p32 = perplexity(all_position_logits(tmp_path / "f32" / "model.onnx", tmp_path / "c"), ids, 16, 1, 16, ref=ref)
    p4 = perplexity(all_position_logits(tmp_path / "q4" / "model.onnx", tmp_path / "c"), ids, 16, 1, 16, ref=ref)
    assert p32["tokens_scored"] == p4["tokens_scored"] == 37 and np.isfinite(p4["ppl"])
    assert 0 < p4["mean_kl_vs_fp32_baseline"] and 0 < p4["top1_agreement_vs_fp32_baseline"] <= 1
    rec = matched_linears((tmp_path / "f32", "model.onnx"), (tmp_path / "f32", "model_unfused.onnx"),
                          (tmp_path / "q4", "model.onnx"), (tmp_path / "q4", "model_unfused.onnx"))
    assert rec["n_folded_linears"] == 5 and all(r["rel_folded"] > 0 for r in rec["linears"])  # 2 x (qkv, gate_up) + lm_head
    assert step_weight_bytes(tmp_path / "q4" / "model.onnx") < step_weight_bytes(tmp_path / "f32" / "model.onnx") / 4
