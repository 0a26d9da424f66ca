"""Normalization-statistic ops in an ONNX graph, attributed to layers through the torch exporter's metadata."""
from __future__ import annotations

import ast

import onnx

__all__ = ["check_statistics", "STAT_OPS", "pos0_counts", "bound_counts"]

STAT_OPS = ("ReduceMean", "Pow", "Sqrt", "Reciprocal", "SimplifiedLayerNormalization", "LayerNormalization",
            "SkipSimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization")


# -- statistics checker -------------------------------------------------------------------------------
def _scope(node) -> str | None:
    """Innermost module path from the torch exporter's name_scopes metadata (None when absent)."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)  # a Python list literal of str
            except (ValueError, SyntaxError):
                return None
            mods = [s for s in scopes[:-1] if s]
            return mods[-1] if mods else ""
    return None


def _constants(model: onnx.ModelProto) -> dict:
    """{tensor name: numpy value} of initializers and Constant nodes (to read Pow exponents)."""
    from onnx import numpy_helper
    out = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = n.attribute[0].t
    return {k: numpy_helper.to_array(v) for k, v in out.items() if len(v.dims) == 0 or list(v.dims) == [1]}


def _is_statistic(n, consts: dict) -> bool:
    """A STAT_OPS node; a Pow only with exponent 2 (x ** 3 in GPT-2's tanh GELU is an activation, not a norm)."""
    if n.op_type != "Pow":
        return n.op_type in STAT_OPS
    exp = consts.get(n.input[1]) if len(n.input) > 1 else None
    return exp is None or float(exp.reshape(-1)[0]) == 2.0


def _matches(scope: str, layer: str) -> bool:
    return scope == layer or scope.endswith("." + layer) or f".{layer}." in f".{scope}." or scope.startswith(layer + ".")


def check_statistics(model: onnx.ModelProto, folded_layers: list[str], expect_total: int | None = None,
                     scope=None, ignore=None) -> dict:
    """Check no normalization-statistic op (STAT_OPS) belongs to a folded layer.

    Nodes are attributed to layers through the torch exporter's name_scopes metadata. `expect_total`
    (optional) bounds the statistic ops allowed in the whole graph (e.g. 0 for a fully folded model),
    which also covers nodes without metadata. `scope(node) -> module path | None` replaces the metadata
    lookup (the lean builder names its nodes after their module); `ignore(node) -> bool` drops nodes that are
    not statistics there (an explicit LN map's mean-centering). Returns {"ok", "offending": {layer: [node names]},
    "total": n, "by_op": {...}, "unattributed": n, "reason"}.
    """
    offending: dict[str, list[str]] = {}
    by_op: dict[str, int] = {}
    total = unattributed = 0
    consts = _constants(model)
    for n in model.graph.node:
        if not _is_statistic(n, consts) or (ignore is not None and ignore(n)):
            continue
        total += 1
        by_op[n.op_type] = by_op.get(n.op_type, 0) + 1
        where = (scope or _scope)(n)
        if where is None:
            unattributed += 1
            continue
        for layer in folded_layers:
            if _matches(where, layer):
                offending.setdefault(layer, []).append(f"{n.name} ({n.op_type})")
    reason = None
    if offending:
        first = next(iter(offending))
        reason = f"folded layer {first} still computes statistics: {', '.join(offending[first][:3])}"
    elif expect_total is not None and total > expect_total:
        reason = f"{total} statistic ops remain ({by_op}), at most {expect_total} expected"
    return {"ok": reason is None, "offending": offending, "total": total, "by_op": by_op,
            "unattributed": unattributed, "folded_layers": list(folded_layers), "reason": reason}


# -- position-0 factors (tapernorm/pos0.py) ---------------------------------------------------------------
def pos0_counts(model: onnx.ModelProto) -> dict:
    """The position-0 factor nodes of a graph (norms with c0): {"wheres": Where(position == 0, c0 / c, 1) nodes
    (lean: named `pos0/Where_k`; generic export: reading a `*.pos0_ratio` initializer), "muls": the Mul nodes
    applying one (through Unsqueeze / Cast), "equal": Equal nodes feeding them}; all 0 for a model without c0."""
    wheres = [n for n in model.graph.node if n.op_type == "Where" and (
        n.name.startswith("pos0/Where") or any(i.endswith("pos0_ratio") or "pos0_ratio_" in i for i in n.input))]
    values = {o for n in wheres for o in n.output}
    conds = {n.input[0] for n in wheres}
    grew = True
    while grew:  # follow the factor through shape / dtype ops
        grew = False
        for n in model.graph.node:
            if n.op_type in ("Unsqueeze", "Cast", "Reshape", "Expand", "Split") and n.input and n.input[0] in values \
                    and not set(n.output) <= values:
                values |= set(n.output)
                grew = True
    muls = sum(1 for n in model.graph.node if n.op_type == "Mul" and any(i in values for i in n.input))
    producer = {o: n for n in model.graph.node for o in n.output}
    equal = set()
    for c in {n.input[0] for n in wheres}:  # the condition, back through Unsqueeze / Cast to its Equal
        n = producer.get(c)
        while n is not None and n.op_type in ("Unsqueeze", "Cast"):
            n = producer.get(n.input[0])
        if n is not None and n.op_type == "Equal":
            equal.add(n.name or id(n))
    return {"wheres": len(wheres), "muls": muls, "equal": len(equal)}


# -- bounded maps (tapernorm/bound.py) ---------------------------------------------------------------------
def bound_counts(rep_fold: dict, models: dict[str, onnx.ModelProto]) -> dict:
    """{"sites": norms the passes kept as bounded maps tanh(x * c / B [* p]) (folded or explicit), "bound": the
    distinct scalar Bs, "per_feature": the sites with a B per feature, and per graph file the Tanh nodes it has};
    sites 0 for a model without bounded maps."""
    rows = {k: r for k, r in (rep_fold.get("layers") or {}).items() if r.get("bound") and r["status"] != "skipped"}
    scalar = [r["bound"] for r in rows.values() if not isinstance(r["bound"], dict)]
    return {"sites": len(rows), "bound": sorted(set(scalar)), "per_feature": len(rows) - len(scalar),
            **{f: {"tanh": sum(1 for n in m.graph.node if n.op_type == "Tanh")} for f, m in models.items()}}
