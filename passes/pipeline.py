"""The pass pipeline: capture -> detect -> materialize -> [fold] -> cleanup -> verify, one JSON report.

Runs on torch.fx's pass-manager infrastructure (torch.fx.passes.infra.pass_manager.PassManager)
with graph checks (lint + every get_attr resolves) before and after each pass.
"""
from __future__ import annotations

import copy
import inspect
import time
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.infra.pass_manager import PassManager

from tapernorm.bound import bound_json, bound_prescale
from tapernorm.layers import TAPER_TYPES

from .capture import capture, no_cache_default
from .fold_math import taper_map
from .backward import apply_backward, plan_backward
from .bound import is_bounded
from .fold import apply_fold, plan_fold
from .graph_utils import cleanup, drop_unused_attrs, graph_check
from .linears import StorageIndex
from .match import GATE_NAME, find_sites, site_refusal, stat_ops, taper_classes
from .materialize import materialize_site
from .pos0 import pos0_ratio_value
from .verify import run_outputs, verify_rewrite

__all__ = ["fold", "materialize", "FoldState", "SiteResult", "SITES_META", "site_results"]

SITES_META = "tapernorm.sites"  # gm.meta key of the typed per-site results


@dataclass(frozen=True)
class SiteResult:
    """What the passes did at one TaperNorm site (typed; the JSON report's "layers" row is its printable twin).

    status: "folded" (no op left: `direction` "forward" into the consumers, "backward" into the producer's
    rows) | "materialized" (the explicit map x * scale (RMS) or (x - mean x) * scale + shift (LN) is in the graph)
    | "skipped" (kept as it was; `reason` says why). scale / shift: the gate-0 map (float64, (d,)).
    pos0: the site's position-0 factor c0 / c (float32 value) when the layer has c0 (passes/pos0.py): a folded or
    materialized site then keeps one Mul by p = where(position == 0, pos0, 1) (B, T, 1); None without c0.
    bound_prescale: a = c / B of a bounded layer (tapernorm/bound.py), float32 of shape () or (d,) (a bound per
    feature): the site keeps tanh(x * a [* p]) in front of its scale (folded or explicit); None for the linear map.
    """
    name: str
    kind: str
    status: str
    direction: str | None
    scale: torch.Tensor | None
    shift: torch.Tensor | None
    reason: str | None
    pos0: float | None = None
    bound_prescale: torch.Tensor | None = None  # a = c / B, () or (d,) (passes/bound.py): tanh(x * a [* p]) * scale


def site_results(gm: fx.GraphModule) -> dict[str, SiteResult]:
    """{site path in the captured module: SiteResult} that fold / materialize attached to their GraphModule."""
    return dict(gm.meta.get(SITES_META, {}))


class FoldState:
    """What the passes share: the source module, the call sites, per-layer report rows."""

    def __init__(self, original: nn.Module, untie_embeddings: bool = True):
        self.original, self.untie_embeddings = original, untie_embeddings
        self.sites, self.accepted, self.layers, self.released, self.passes = [], [], {}, set(), []

    def row(self, name: str, **kw) -> dict:
        r = self.layers.setdefault(name, {"status": "skipped", "reason": None, "consumers": [], "untied": []})
        r.update(kw)
        return r


def _retarget(sites, old: fx.Node, new: fx.Node) -> None:
    """Sites whose input was `old` (a rewritten site's output, e.g. BLOOM's embedding LN feeding layer 0's) read `new`."""
    for s in sites:
        if s.input is old:
            s.input = new


class _Pass:
    """A pass on a GraphModule returning PassResult; records its name, count, time and node count."""
    name = "pass"

    def __init__(self, state: FoldState):
        self.state = state

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        t0 = time.perf_counter()
        count = self.run(gm)
        gm.graph.lint()  # no recompile here: PassManager recompiles after every pass (one per pass, not two)
        self.state.passes.append({"name": self.name, "count": count, "nodes": len(gm.graph.nodes),
                                  "seconds": round(time.perf_counter() - t0, 4)})
        return PassResult(gm, count > 0)

    def run(self, gm: fx.GraphModule) -> int:
        raise NotImplementedError


class DetectPass(_Pass):
    """Find TaperNorm call sites; accept gate-0, calibrated, eval ones; report every other with its reason."""
    name = "detect"

    def run(self, gm):
        st = self.state
        st.sites, uncalled = find_sites(gm, st.original)
        for site in st.sites:
            m = site.module
            reason = site_refusal(site)
            st.row(site.name, kind=site.kind, gate=float(getattr(m, "gate", float("nan"))), reason=reason)
            if site.pos0 and isinstance(m, TAPER_TYPES):
                st.row(site.name, pos0_ratio=float(pos0_ratio_value(m)))
            if is_bounded(site):
                st.row(site.name, bound=bound_json(m.bound), bound_prescale=bound_json(bound_prescale(m)))
            if reason is None:
                st.accepted.append(site)
        for name, m in uncalled:
            st.row(name, kind="ln" if type(m).__name__ == "TaperLayerNorm" else "rms", gate=float(m.gate),
                   reason=f"{name}: not called in the captured graph")
        return len(st.accepted)


class MaterializePass(_Pass):
    """Replace each accepted site by its explicit gate-0 map (no statistic)."""
    name = "materialize"

    def run(self, gm):
        for site in self.state.accepted:
            old = site.output
            self.state.released |= materialize_site(gm, site)
            _retarget(self.state.sites, old, site.output)
            self.state.released |= {f"{site.path}.{n}" for n, _ in site.module.named_parameters()}
            self.state.released |= {f"{site.path}.{n}" for n, _ in site.module.named_buffers()}
            self.state.row(site.name, status="materialized")
        return len(self.state.accepted)


class FoldPass(_Pass):
    """Fold each materialized map into all its consumer linears, or keep it and say why."""
    name = "fold"

    def run(self, gm):
        st, n = self.state, 0
        index = StorageIndex(gm)  # attribute -> storage, resolved once for all sites (was once per site and linear)
        for site in st.accepted:
            consumers, untied, reason = plan_fold(gm, site, st.untie_embeddings, index)
            paths = [c.module_path or c.node.name for c in consumers]
            if reason and is_bounded(site):  # the tanh sits between any producer and the map
                st.row(site.name, reason=f"{reason}; a bounded map does not fold backward")
                continue
            if reason:  # no linear after it: maybe one before it (post-norm, QK-norm)
                plan, why = plan_backward(gm, site, st.untie_embeddings, index)
                if plan is None:
                    st.row(site.name, reason=f"{reason}; backward fold: {why}")
                    continue
                released, created = apply_backward(gm, site, plan, index)
                untied = plan.untied
                producer = ", ".join(dict.fromkeys(c.module_path or c.node.name for c in plan.leaves or [plan.linear]))
                st.row(site.name, direction="backward", producer=producer)
            else:
                released, created = apply_fold(gm, site, consumers, index)
                st.row(site.name, direction="forward")
            _retarget(st.sites, site.output, site.input)  # a norm reading this one's output reads its input now
            st.released |= released
            st.row(site.name, status="folded", consumers=paths,
                   untied=[f"{t} (storage shared with an embedding; the head now reads "
                           f"{next((c for c in created if c.startswith(t)), t)})" for t in untied])
            n += 1
        return n


class CleanupPass(_Pass):
    """Drop the map's dead nodes and the attributes nothing reads anymore; DCE, lint, recompile."""
    name = "cleanup"

    def run(self, gm):
        dropped = drop_unused_attrs(gm, self.state.released)
        cleanup(gm, recompile=False)  # PassManager recompiles after the pass
        return len(dropped)


def _taper_nodes(gm: fx.GraphModule) -> int:
    """Nodes inside a TaperNorm call (a gated norm's x * act(gate) product, which stays, not counted)."""
    names = {f"{t.__module__}.{t.__qualname__}" for t in taper_classes()}

    def name(t):
        return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"

    count = 0
    for n in gm.graph.nodes:
        stack = list((n.meta.get("nn_module_stack") or {}).values())
        if stack and name(stack[-1][1]) != GATE_NAME and any(name(v[1]) in names for v in stack):
            count += 1
    return count


def _keep_varargs_signature(gm: fx.GraphModule, module: nn.Module) -> None:
    """Give gm.forward the source's signature when it takes *args, so the same dynamic_shapes re-export it.

    The exported module flattens `forward(self, a, *rest)` to one named parameter per tensor; torch.export
    binds dynamic_shapes through inspect.signature, so without this the caller's spec would not match.
    (A later gm.recompile() drops this; the flattened form still runs.)
    """
    sig = inspect.signature(module.forward)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values()):
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        type(gm).forward.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])


def _reference_outputs(mode: str, module, args: tuple, kwargs: dict) -> list:
    """The source module's outputs on the example inputs; a model that cannot run them is one clear error."""
    try:
        return run_outputs(module, args, kwargs)
    except Exception as e:  # the user's model raised: say so in one line, keep the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{mode}: {type(module).__name__} fails on the example inputs ({type(e).__name__}: {first}); "
                         "pass example_args / example_kwargs the model accepts") from e


def _run(mode: str, module, example_args, example_kwargs, dynamic_shapes, original, untie_embeddings, verify):
    if isinstance(example_args, torch.Tensor):
        example_args = (example_args,)
    example_args, example_kwargs = tuple(example_args or ()), dict(example_kwargs or {})
    if isinstance(module, fx.GraphModule):
        if original is None:
            raise ValueError(f"{mode}: got a GraphModule without original=; pass the nn.Module it was captured from "
                             "(its TaperNorm layers hold the gates)")
        with warnings.catch_warnings():  # torch's own pytree pickling of the codegen warns (LeafSpec deprecation)
            warnings.simplefilter("ignore", FutureWarning)
            graph = copy.deepcopy(module.graph)
        gm = fx.GraphModule(module, graph)  # new attribute tree, same tensors
        gm.meta.update(module.meta)
    elif isinstance(module, nn.Module):
        gm, original = None, original if original is not None else module
    else:
        raise TypeError(f"{mode}: expected an nn.Module or fx.GraphModule, got {type(module).__name__}")
    if original.training:
        raise ValueError(f"{mode}: {type(original).__name__} is in training mode; call model.eval() first "
                         "(passes only rewrite eval-mode graphs)")
    with no_cache_default(module, example_args, example_kwargs) as no_cache:  # HF: capture sets it the same way
        ref = _reference_outputs(mode, module, example_args, example_kwargs) if verify else None
    if gm is None:
        gm = capture(module, example_args, example_kwargs, dynamic_shapes)
    nodes_before, taper_before, stats_before = len(gm.graph.nodes), _taper_nodes(gm), stat_ops(gm)
    state = FoldState(original, untie_embeddings)
    passes = [DetectPass(state), MaterializePass(state)]
    if mode == "fold":
        passes.append(FoldPass(state))
    passes.append(CleanupPass(state))
    pm = PassManager(passes, run_checks_after_each_pass=True)
    pm.add_checks(graph_check)
    try:
        gm = pm(gm).graph_module
    except Exception as e:  # PassManager hides the cause behind "An error occurred when running ..."
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise RuntimeError(f"{mode}: {str(e).strip().splitlines()[0]}: {type(cause).__name__}: {first}") from e
    counts = {s: sum(1 for r in state.layers.values() if r["status"] == s) for s in ("folded", "materialized", "skipped")}
    counts["pos0_factors"] = sum(1 for r in state.layers.values()
                                 if r.get("pos0_ratio") is not None and r["status"] != "skipped")
    report = {
        "pass": mode, **counts,
        "layers": state.layers,
        "graph": {"nodes_before": nodes_before, "nodes_after": len(gm.graph.nodes),
                  "taper_nodes_before": taper_before, "taper_nodes_after": _taper_nodes(gm),
                  "stat_ops_before": stats_before, "stat_ops_after": stat_ops(gm)},
        "passes": state.passes,
        "capture": {"use_cache": False, "why": "forward takes use_cache and the call left it unset; captured "
                    "without a KV cache (the folded module returns none)"} if no_cache else {},
        "verify": None,
    }
    if isinstance(module, nn.Module) and not isinstance(module, fx.GraphModule):
        _keep_varargs_signature(gm, module)
    gm.meta[SITES_META] = _typed_results(state)
    if verify:
        report["verify"] = verify_rewrite(ref, run_outputs(gm, example_args, example_kwargs), original,
                                          example_args, example_kwargs)
    return gm, report


def _typed_results(state: FoldState) -> dict[str, SiteResult]:
    """One SiteResult per report row; the map (s, beta_t) of every accepted site, computed here once."""
    maps = {site.name: taper_map(site.module) for site in state.accepted}
    pres = {site.name: bound_prescale(site.module) for site in state.accepted if is_bounded(site)}
    out = {}
    for name, r in state.layers.items():
        s, beta = maps.get(name, (None, None))
        out[name] = SiteResult(name, r.get("kind", "rms"), r["status"], r.get("direction"), s, beta, r.get("reason"),
                               r.get("pos0_ratio"), pres.get(name) if r["status"] != "skipped" else None)
    return out


def fold(module: nn.Module, example_args=(), example_kwargs: dict | None = None, dynamic_shapes=None,
         original: nn.Module | None = None, *, untie_embeddings: bool = True, verify: bool = True):
    """Fold every gate-zero TaperNorm into its consumer linears; returns (GraphModule, JSON-ready report)."""
    return _run("fold", module, example_args, example_kwargs, dynamic_shapes, original, untie_embeddings, verify)


def materialize(module: nn.Module, example_args=(), example_kwargs: dict | None = None, dynamic_shapes=None,
                original: nn.Module | None = None, *, verify: bool = True):
    """Replace every gate-zero TaperNorm with its explicit map (the unfused graph); returns (GraphModule, report)."""
    return _run("materialize", module, example_args, example_kwargs, dynamic_shapes, original, True, verify)
