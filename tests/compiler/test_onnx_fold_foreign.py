"""onnx_fold on foreign graph shapes: a map read through Reshape / Flatten (HF Conv1D exports), backward folds
into a linear's output columns (post-norms, per-head QK-norms), scalar Muls reported apart from norm sites,
and fold_onnx_file's onnxruntime check (report, refusal to write on a mismatch, external data in and out)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tapernorm.compiler.onnx_fold import VerifyError, fold_onnx, fold_onnx_file
from tapernorm.compiler.onnx_io import save_onnx

RNG = np.random.default_rng(1)
D, H, HD = 8, 2, 4  # hidden, heads, head dim (H * HD == D)


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def _model(nodes, inits, inputs, outputs, opset=17):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=inits),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _run(model, feeds):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _same(a, b, shape=(2, 3, D)):
    feeds = {"x": (RNG.standard_normal(shape) * 2 + 0.3).astype(np.float32)}
    for u, v in zip(_run(a, feeds), _run(b, feeds)):
        np.testing.assert_allclose(u, v, atol=1e-5, rtol=1e-5)


def _ln(x, out, s="s", beta="beta"):
    return [helper.make_node("ReduceMean", [x], [x + "_mu"], axes=[-1], keepdims=1),
            helper.make_node("Sub", [x, x + "_mu"], [x + "_c"]),
            helper.make_node("Mul", [x + "_c", s], [x + "_cs"]),
            helper.make_node("Add", [x + "_cs", beta], [out], name=f"{x}_ln")]


def test_ln_through_reshape_into_gemm_like_hf_conv1d():
    """GPT-2's Conv1D: LN -> Reshape(-1, d) -> Gemm(., W (in, out), b) -> Reshape back."""
    nodes = _ln("x", "h") + [helper.make_node("Reshape", ["h", "flat"], ["h2"]),
                             helper.make_node("Gemm", ["h2", "W", "b"], ["z"], name="c_attn"),
                             helper.make_node("Reshape", ["z", "back"], ["y"])]
    inits = [_init("s", RNG.uniform(0.5, 1.5, D)), _init("beta", RNG.uniform(-0.3, 0.3, D)),
             _init("W", RNG.standard_normal((D, 3 * D))), _init("b", RNG.standard_normal(3 * D)),
             numpy_helper.from_array(np.array([-1, D], np.int64), "flat"),
             numpy_helper.from_array(np.array([2, 3, 3 * D], np.int64), "back")]
    m = _model(nodes, inits, [_vi("x", [2, 3, D])], [_vi("y", [2, 3, 3 * D])])
    f, rep = fold_onnx(m)
    assert rep["folded"] == 1 and rep["sites"][0]["consumers"] == ["c_attn"] and not rep["refused"], rep
    assert [n.op_type for n in f.graph.node] == ["Reshape", "Gemm", "Reshape"] and rep["stat_ops_after"] == 0
    _same(m, f)


def test_flatten_that_merges_features_is_refused():
    nodes = [helper.make_node("Mul", ["x", "s"], ["h"], name="map"),
             helper.make_node("Flatten", ["h"], ["h2"], axis=1),  # (2, 3*D): rows of d merged
             helper.make_node("MatMul", ["h2", "W"], ["y"])]
    m = _model(nodes, [_init("s", RNG.uniform(0.5, 1.5, D)), _init("W", RNG.standard_normal((3 * D, 5)))],
               [_vi("x", [2, 3, D])], [_vi("y", [2, 5])])
    f, rep = fold_onnx(m)
    assert rep["folded"] == 0 and "merges features" in rep["refused"][0]["reason"], rep
    _same(m, f)


@pytest.mark.parametrize("ln", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
def test_backward_fold_into_producing_linear(ln, per_head):
    """q = x W + b -> [Reshape to heads] -> norm map -> Transpose (RoPE-ish reader, no linear): folds into W's columns."""
    d = HD if per_head else D
    q = ["Reshape"] if per_head else []
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="q_proj"), helper.make_node("Add", ["mm", "b"], ["q"])]
    src = "q"
    if per_head:
        nodes.append(helper.make_node("Reshape", ["q", "heads"], ["qh"]))
        src = "qh"
    nodes += _ln(src, "n") if ln else [helper.make_node("Mul", [src, "s"], ["n"], name="q_norm")]
    nodes.append(helper.make_node("Transpose", ["n"], ["y"], perm=[0, 2, 1, 3] if per_head else [0, 2, 1]))
    inits = [_init("W", RNG.standard_normal((D, D))), _init("b", RNG.standard_normal(D)),
             _init("s", RNG.uniform(0.5, 1.5, d)), numpy_helper.from_array(np.array([2, 3, H, HD], np.int64), "heads")]
    if ln:
        inits.append(_init("beta", RNG.uniform(-0.3, 0.3, d)))
    out_shape = [2, H, 3, HD] if per_head else [2, D, 3]
    m = _model(nodes, inits, [_vi("x", [2, 3, D])], [_vi("y", out_shape)])
    f, rep = fold_onnx(m)
    assert rep["folded"] == 1 and rep["sites"][0]["direction"] == "backward" and rep["sites"][0]["producer"] == "q_proj"
    ops = [n.op_type for n in f.graph.node]
    assert "Mul" not in ops and "ReduceMean" not in ops and ops[:2] == ["MatMul", "Add"] and len(ops) == 3 + bool(q)
    _same(m, f)


def test_backward_refused_when_linear_output_has_another_reader():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["q"], name="o_proj"),
             helper.make_node("Mul", ["q", "s"], ["n"], name="post_norm"),
             helper.make_node("Add", ["n", "q"], ["y"])]  # reads the un-normed output too
    m = _model(nodes, [_init("W", RNG.standard_normal((D, D))), _init("s", RNG.uniform(0.5, 1.5, D))],
               [_vi("x", [2, 3, D])], [_vi("y", [2, 3, D])])
    f, rep = fold_onnx(m)
    reason = rep["refused"][0]["reason"]
    assert rep["folded"] == 0 and "is Add" in reason and "backward" in reason and "also read outside the map" in reason
    _same(m, f)


def test_scalar_muls_are_not_norm_refusals():
    """An attention-scale style scalar Mul with no constant-weight linear after it is listed apart, not refused."""
    nodes = [helper.make_node("Mul", ["x", "scale"], ["q"], name="attn_scale"),
             helper.make_node("MatMul", ["q", "kT"], ["y"])]
    m = _model(nodes, [_init("scale", np.float32(0.125))], [_vi("x", [2, 3, D]), _vi("kT", [2, D, 3])],
               [_vi("y", [2, 3, 3])])
    _, rep = fold_onnx(m)
    assert rep["folded"] == 0 and rep["refused"] == []
    assert [k["node"] for k in rep["other_muls"]["kept"]] == ["attn_scale"]


def _rms_model():
    nodes = [helper.make_node("Mul", ["x", "s"], ["h"], name="map"), helper.make_node("MatMul", ["h", "W"], ["y"])]
    return _model(nodes, [_init("s", RNG.uniform(0.5, 1.5, D)), _init("W", RNG.standard_normal((D, 600)))],
                  [_vi("x", ["batch", "seq", D])], [_vi("y", ["batch", "seq", 600])])


@pytest.mark.parametrize("external", [False, True])
def test_fold_onnx_file_verifies_and_keeps_external_data(tmp_path, external):
    src, dst = tmp_path / "in.onnx", tmp_path / "out" / "folded.onnx"
    save_onnx(_rms_model(), src, external_data=external)
    assert (tmp_path / "in.onnx.data").exists() == external
    rep = fold_onnx_file(src, dst)
    assert rep["folded"] == 1 and rep["verify"]["ok"] and rep["verify"]["max_abs_diff"] < 1e-4
    assert rep["verify"]["inputs"] == {"x": [3, 3, D]} and rep["external_data"] == external
    assert (dst.parent / "folded.onnx.data").exists() == external
    assert sorted(p.name for p in dst.parent.iterdir()) == sorted(["folded.onnx"] + (["folded.onnx.data"] if external else []))
    forced = fold_onnx_file(src, tmp_path / "forced.onnx", external_data=True)  # inline in, external out
    assert forced["external_data"] and (tmp_path / "forced.onnx.data").exists()


def test_fold_onnx_file_refuses_to_write_a_wrong_fold(tmp_path, monkeypatch):
    import importlib
    mod = importlib.import_module("tapernorm.compiler.onnx_fold")
    real = mod.write_linear

    def off_by_one_percent(graph, n, w_io, b, *a, **k):
        return real(graph, n, w_io * 1.01, b, *a, **k)

    monkeypatch.setattr(mod, "write_linear", off_by_one_percent)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    save_onnx(_rms_model(), src)
    with pytest.raises(VerifyError, match=r"^fold_onnx_file: folded graph differs from in.onnx: output y max abs diff .* nothing written"):
        fold_onnx_file(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


@pytest.mark.parametrize("ln", [False, True])
def test_map_per_head_then_heads_merged_into_a_linear(ln):
    """A per-head map (a gated norm's (x * act(z)) * s) -> Reshape merging heads -> MatMul: column j of the
    merged input is scaled by s[j % head_dim]. An LN map's centering cannot cross the merge: refused."""
    x4 = _vi("x", [2, 3, H, HD])
    nodes = (_ln("x", "h", s="s", beta="beta") if ln else [helper.make_node("Mul", ["x", "s"], ["h"], name="norm")])
    nodes += [helper.make_node("Reshape", ["h", "merge"], ["hm"]), helper.make_node("MatMul", ["hm", "W"], ["y"])]
    inits = [_init("s", RNG.uniform(0.5, 1.5, HD)), _init("W", RNG.standard_normal((D, 5))),
             numpy_helper.from_array(np.array([2, 3, D], np.int64), "merge")]
    if ln:
        inits.append(_init("beta", RNG.uniform(-0.3, 0.3, HD)))
    m = _model(nodes, inits, [x4], [_vi("y", [2, 3, 5])])
    f, rep = fold_onnx(m)
    if ln:
        assert rep["folded"] == 0 and "last dim is 8, not 4" in rep["refused"][0]["reason"], rep
    else:
        assert rep["folded"] == 1 and [n.op_type for n in f.graph.node] == ["Reshape", "MatMul"], rep
    _same(m, f, shape=(2, 3, H, HD))
