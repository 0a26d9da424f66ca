"""onnx_fold on hand-built ONNX graphs: ORT outputs before == after (graph optimizations disabled,
so ORT's own fusions cannot hide a mistake), fold counts, refusals with reasons, statistics checker."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tapernorm.compiler.onnx_fold import check_statistics, fold_onnx

D, OUT, OUT2 = 8, 6, 5
RNG = np.random.default_rng(0)


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


def _model(nodes, inits, inputs, outputs, opset=18):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def _x(shape=("B", "T", D)):
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))


def _y(name, rank=3):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)


def _run(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def _same(before, after, shape=(2, 3, D), atol=1e-5):
    feeds = {"x": RNG.standard_normal(shape).astype(np.float32) * 3 + 0.5}
    a, b = _run(before, feeds), _run(after, feeds)
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, atol=atol, rtol=1e-5)
    return max(float(np.abs(u - v).max()) for u, v in zip(a, b))


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _vec(n=D, lo=0.5, hi=1.5):
    return RNG.uniform(lo, hi, n).astype(np.float32)


def _w(i=D, o=OUT):
    return RNG.standard_normal((i, o)).astype(np.float32)


def test_rms_mul_folds_into_every_matmul():
    nodes = [helper.make_node("Mul", ["x", "s"], ["h"], name="map"),
             helper.make_node("MatMul", ["h", "W1"], ["y1"], name="q"),
             helper.make_node("MatMul", ["h", "W2"], ["y2"], name="k")]
    m = _model(nodes, [_init("s", _vec()), _init("W1", _w()), _init("W2", _w(o=OUT2))], [_x()], [_y("y1"), _y("y2")])
    f, rep = fold_onnx(m)
    assert rep["folded"] == 1 and rep["sites"][0]["rule"] == "rms"
    assert sorted(rep["sites"][0]["consumers"]) == ["k", "q"]
    assert "Mul" not in _ops(f) and _ops(f).count("MatMul") == 2
    _same(m, f)
    onnx.checker.check_model(f)


@pytest.mark.parametrize("opset", [13, 18])
def test_ln_centering_and_shift_fold(opset):
    axes = [] if opset >= 18 else None
    rm = (helper.make_node("ReduceMean", ["x", "axes"], ["mu"], keepdims=1) if opset >= 18
          else helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1], keepdims=1))
    nodes = [rm, helper.make_node("Sub", ["x", "mu"], ["c"]),
             helper.make_node("Mul", ["c", "s"], ["cs"]),
             helper.make_node("Add", ["cs", "beta"], ["h"], name="ln_out"),
             helper.make_node("MatMul", ["h", "W1"], ["z1"], name="fc"),
             helper.make_node("Add", ["z1", "b1"], ["y1"]),  # bias add: folded into
             helper.make_node("MatMul", ["h", "W2"], ["y2"], name="nobias")]  # no bias: an Add is inserted
    inits = [_init("s", _vec()), _init("beta", _vec(lo=-0.5, hi=0.5)), _init("W1", _w()), _init("b1", _vec(OUT)),
             _init("W2", _w(o=OUT2))]
    if axes is not None:
        inits.append(_init("axes", np.array([-1], np.int64)))
    m = _model(nodes, inits, [_x()], [_y("y1"), _y("y2")], opset=opset)
    f, rep = fold_onnx(m)
    assert rep["folded"] == 1 and rep["sites"][0]["rule"] == "ln"
    assert "ReduceMean" not in _ops(f) and "Sub" not in _ops(f) and "Mul" not in _ops(f)
    assert _ops(f).count("Add") == 2  # the folded bias add and the inserted one
    _same(m, f)


@pytest.mark.parametrize("shift", [False, True])
def test_ln_gemm_consumers(shift):
    """Gemm consumers (transB, alpha, beta, with and without C); the shift goes into C."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[1], keepdims=1),
             helper.make_node("Sub", ["x", "mu"], ["c"]),
             helper.make_node("Mul", ["s", "c"], ["cs" if shift else "h"])]  # constant on the left
    inits = [_init("s", _vec()), _init("Bt", _w().T.copy()), _init("C", _vec(OUT)), _init("B2", _w(o=OUT2))]
    if shift:
        nodes.append(helper.make_node("Add", ["beta", "cs"], ["h"]))
        inits.append(_init("beta", _vec(lo=-0.5, hi=0.5)))
    nodes += [helper.make_node("Gemm", ["h", "Bt", "C"], ["y1"], transB=1, alpha=0.5, beta=2.0),
              helper.make_node("Gemm", ["h", "B2"], ["y2"], alpha=1.5)]
    m = _model(nodes, inits, [_x(("N", D))], [_y("y1", 2), _y("y2", 2)], opset=13)
    f, rep = fold_onnx(m)
    assert rep["folded"] == 1 and _ops(f) == ["Gemm", "Gemm"], rep["refused"]
    _same(m, f, shape=(4, D))


def test_mul_add_without_centering_is_refused():
    nodes = [helper.make_node("Mul", ["x", "s"], ["cs"]), helper.make_node("Add", ["cs", "beta"], ["h"]),
             helper.make_node("Gemm", ["h", "B"], ["y"], alpha=0.7)]
    # no centering: not the LN pattern; Mul feeds Add, so the rms rule refuses it (nothing folds)
    m = _model(nodes, [_init("s", _vec()), _init("beta", _vec()), _init("B", _w())], [_x(("N", D))], [_y("y", 2)])
    f, rep = fold_onnx(m)
    assert rep["folded"] == 0 and "is Add" in rep["refused"][0]["reason"]
    _same(m, f, shape=(4, D))


def test_shared_weight_is_untied():
    nodes = [helper.make_node("Mul", ["x", "s"], ["h"], name="map"),
             helper.make_node("MatMul", ["h", "W"], ["y1"]),
             helper.make_node("MatMul", ["x", "W"], ["y2"])]  # reads W without the map
    m = _model(nodes, [_init("s", _vec()), _init("W", _w())], [_x()], [_y("y1"), _y("y2")])
    f, rep = fold_onnx(m)
    assert rep["folded"] == 1 and rep["sites"][0]["untied"] == ["W"]
    assert {i.name for i in f.graph.initializer} >= {"W", "W_tnfold"}
    _same(m, f)


@pytest.mark.parametrize("case", ["other_consumer", "graph_output", "not_per_feature", "dynamic_weight"])
def test_refusals_keep_graph_exact(case):
    s = _vec()
    nodes = [helper.make_node("Mul", ["x", "s"], ["h"], name="map"), helper.make_node("MatMul", ["h", "W"], ["y1"])]
    inputs, outputs = [_x(("B", 3, D))], [_y("y1")]
    if case == "other_consumer":
        nodes.append(helper.make_node("Relu", ["h"], ["r"], name="relu"))
        outputs.append(_y("r"))
        want = "Relu"
    elif case == "graph_output":
        outputs.append(_y("h"))
        want = "graph output"
    elif case == "not_per_feature":
        s = RNG.uniform(0.5, 1.5, (3, D)).astype(np.float32)  # varies over tokens
        want = "per-feature"
    else:
        nodes[1] = helper.make_node("MatMul", ["h", "Wdyn"], ["y1"])
        inputs.append(helper.make_tensor_value_info("Wdyn", TensorProto.FLOAT, [D, OUT]))
        want = "constant"
    inits = [_init("s", s)] + ([_init("W", _w())] if case != "dynamic_weight" else [])
    m = _model(nodes, inits, inputs, outputs)
    f, rep = fold_onnx(m)
    assert rep["folded"] == 0
    # a constant that varies over tokens is no norm map: listed with the other constant Muls, not refused
    kept = rep["other_muls"]["kept"] if case == "not_per_feature" else rep["refused"]
    assert any(want in r["reason"] for r in kept), rep
    assert "Mul" in _ops(f)
    if case != "dynamic_weight":
        _same(m, f, shape=(2, 3, D))


def test_input_model_untouched_and_metadata_kept():
    nodes = [helper.make_node("Mul", ["x", "s"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"])]
    m = _model(nodes, [_init("s", _vec()), _init("W", _w())], [_x()], [_y("y")])
    m.metadata_props.add(key="k", value="v")
    before = m.SerializeToString()
    f, _ = fold_onnx(m)
    assert m.SerializeToString() == before
    assert f.ir_version == m.ir_version and {p.key: p.value for p in f.metadata_props} == {"k": "v"}


def _scoped(node, scope):
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(["", "m", scope, node.name]))
    return node


def test_statistics_checker_names_offending_layer():
    nodes = [_scoped(helper.make_node("Pow", ["x", "two"], ["p"], name="pow"), "m.layers.0.input_layernorm"),
             _scoped(helper.make_node("ReduceMean", ["p"], ["v"], axes=[-1], name="rm"), "m.layers.0.input_layernorm"),
             _scoped(helper.make_node("Sqrt", ["v"], ["r"], name="sqrt"), "m.norm"),
             helper.make_node("Div", ["x", "r"], ["y"])]
    m = _model(nodes, [_init("two", np.float32(2))], [_x()], [_y("y")], opset=13)
    bad = check_statistics(m, ["layers.0.input_layernorm", "layers.1.input_layernorm"])
    assert not bad["ok"] and list(bad["offending"]) == ["layers.0.input_layernorm"]
    assert "layers.0.input_layernorm" in bad["reason"] and bad["total"] == 3
    good = check_statistics(m, ["layers.1.input_layernorm"])
    assert good["ok"] and good["total"] == 3
    capped = check_statistics(m, [], expect_total=0)
    assert not capped["ok"] and "3 statistic ops" in capped["reason"]


def test_cleanup_onnx_drops_dead_nodes_and_toposorts():
    """Nodes out of order plus a dead branch: cleanup_onnx sorts, prunes, keeps node metadata and outputs."""
    from tapernorm.compiler.onnx_fold import cleanup_onnx
    nodes = [helper.make_node("MatMul", ["h", "W"], ["y"], name="mm"),  # reads h before it is produced
             helper.make_node("Mul", ["x", "s"], ["h"], name="map"),
             helper.make_node("Relu", ["x"], ["dead"], name="dead_relu")]  # output unused
    _scoped(nodes[0], "m.lin")
    g = helper.make_graph(nodes, "g", [_x()], [_y("y")], initializer=[_init("s", _vec()), _init("W", _w()),
                                                                       _init("unused", _w())])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(m)  # not topologically sorted
    c, rep = cleanup_onnx(m)
    onnx.checker.check_model(c)
    assert _ops(c) == ["Mul", "MatMul"] and rep["nodes_before"] == 3 and rep["nodes_after"] == 2
    assert rep["initializers_after"] == 2 and "unused" not in {i.name for i in c.graph.initializer}
    assert c.ir_version == 9 and [p.key for p in c.graph.node[1].metadata_props] == ["pkg.torch.onnx.name_scopes"]
    _same(m, c)
