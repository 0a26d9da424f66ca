"""Verify a rewritten module against reference outputs: max abs diff per output, dtype-aware tolerance."""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

__all__ = ["VerifyError", "TOLERANCES", "run_outputs", "compare_outputs", "verify_rewrite", "float64_check"]

# float64_check: the rewrite may be this many times further from the float64 answer than the original's own float32
# evaluation is (both are float32 rounding of the same computation; a wrong fold is off by O(|output|), not O(eps))
F64_SLACK = 4.0


class VerifyError(RuntimeError):
    """The rewritten graph's outputs differ from the original's past the tolerance."""


# (atol, rtol): an output passes when max|new - ref| <= atol + rtol * max|ref|
TOLERANCES = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (2e-2, 4e-2),
}


@torch.no_grad()
def run_outputs(fn, args: tuple, kwargs: dict | None) -> list:
    """Call fn(*args, **kwargs) and flatten the result (tuples, lists, dicts, HF ModelOutputs) to leaves."""
    out = fn(*args, **(kwargs or {}))
    if hasattr(out, "to_tuple") and callable(out.to_tuple):  # HF ModelOutput
        out = out.to_tuple()
    return pytree.tree_leaves(out)


def _nonfinite_message(ref: list, original=None) -> str | None:
    """One line when the ORIGINAL model's outputs are not finite (then no fold can be checked), else None; at gate 0
    it adds why that usually happens (a pretrained model tapered without fine-tuning overflows)."""
    for i, r in enumerate(ref):
        if isinstance(r, torch.Tensor) and r.is_floating_point() and r.numel() and not torch.isfinite(r).all():
            nan, inf = int(torch.isnan(r).sum()), int(torch.isinf(r).sum())
            msg = (f"verify: the original model's outputs are not finite (output {i} {list(r.shape)}: {nan} nan, "
                   f"{inf} inf of {r.numel()} values), so the rewrite cannot be checked against them")
            gates = []
            if original is not None:
                from tapernorm.layers import taper_layers
                gates = [m.gate for _, m in taper_layers(original)]
            if gates and all(g == 0.0 for g in gates):
                msg += ("; at gate 0 a real pretrained model tapered without fine-tuning overflows: fine-tune through "
                        "the taper schedule first (tapernorm finetune), then fold")
            else:
                msg += "; check the weights and the example inputs"
            return msg
    return None


def compare_outputs(ref: list, new: list, strict: bool = True, original=None) -> dict:
    """Max abs diff of every output leaf, tolerances and argmax agreement of the first float output.

    Non-finite reference outputs are a VerifyError that says so first (`original`, the source module, lets it
    name the gate-0 cause)."""
    bad_ref = _nonfinite_message(ref, original)
    if bad_ref and strict:
        raise VerifyError(bad_ref)
    if len(ref) != len(new):
        raise VerifyError(f"verify: the rewritten module returns {len(new)} outputs, the original {len(ref)}")
    rows, worst, failures, agree = [], 0.0, [], None
    for i, (r, n) in enumerate(zip(ref, new)):
        if not isinstance(r, torch.Tensor):
            continue
        if not isinstance(n, torch.Tensor) or r.shape != n.shape or r.dtype != n.dtype:
            raise VerifyError(f"verify: output {i} changed from {_desc(r)} to {_desc(n)}")
        if r.is_floating_point():
            diff = (n.double() - r.double()).abs().max().item() if r.numel() else 0.0
            scale = r.double().abs().max().item() if r.numel() else 0.0
            atol, rtol = TOLERANCES.get(r.dtype, (1e-5, 1e-4))
            tol = atol + rtol * scale
            if agree is None and r.dim() >= 1 and r.shape[-1] > 1 and r.numel():
                agree = (r.argmax(-1) == n.argmax(-1)).double().mean().item()
        else:
            diff = 0.0 if torch.equal(r, n) else math.inf
            tol = 0.0
        ok = diff <= tol and math.isfinite(diff)
        rows.append({"index": i, "shape": list(r.shape), "dtype": str(r.dtype).replace("torch.", ""),
                     "max_abs_diff": diff, "tol": tol, "ok": ok})
        worst = max(worst, diff)
        if not ok:
            failures.append(f"output {i} {list(r.shape)} {r.dtype}: max abs diff {diff:.3g} > tol {tol:.3g}")
    report = {"max_abs_diff": worst, "ok": not failures, "outputs": rows, "argmax_agree": agree}
    if failures and strict:
        raise VerifyError("verify: rewritten graph differs from the original: " + "; ".join(failures[:3]))
    return report


def _desc(t) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def verify_rewrite(ref: list, new: list, original=None, args: tuple = (), kwargs: dict | None = None) -> dict:
    """compare_outputs, strict. When float32 outputs miss the float32 tolerance and `original` is given, a float64
    run of the original decides (float64_check): real checkpoints with massive activations (1e4) are so ill-conditioned
    that two float32 evaluations of the same function differ past 1e-4 relative."""
    report = compare_outputs(ref, new, strict=False, original=original)
    if report["ok"]:
        return report
    if original is not None and _nonfinite_message(ref, original) is None:
        report["float64"] = float64_check(original, args, kwargs, ref, new)
        if report["float64"]["ok"]:
            report["ok"] = True
            return report
    try:
        compare_outputs(ref, new, strict=True, original=original)
    except VerifyError as e:
        f64 = report.get("float64")
        raise VerifyError(str(e) + (f"; against float64: {f64['why']}" if f64 else "")) from None
    return report


def float64_check(original, args: tuple, kwargs: dict | None, ref: list, new: list) -> dict:
    """Run `original` in float64 (in place; its float32 tensors are put back) as the exact answer. ok when, on every float32 output, the rewrite's max
    distance to it is at most F64_SLACK x the original float32 evaluation's own distance plus the float32 tolerance:
    the rewrite is as exact as the model's own float32 rounding. Not ok (with why) when some output is not
    float32 or the float64 tensors do not fit in the free memory."""
    if any(isinstance(r, torch.Tensor) and r.is_floating_point() and r.dtype != torch.float32 for r in ref):
        return {"ok": False, "why": "only float32 outputs get a float64 second opinion"}
    need = 8 * sum(p.numel() for p in original.parameters()) + 8 * sum(b.numel() for b in original.buffers())
    free = _free_bytes()
    if free is not None and 1.5 * need > free:
        return {"ok": False, "why": f"a float64 copy needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"}
    cast = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    with _in_float64(original):  # in place, not a deepcopy: hooks on the model (position 0's rows) keep working
        ref64 = run_outputs(original, pytree.tree_map(cast, tuple(args)), pytree.tree_map(cast, dict(kwargs or {})))
    rows, ok = [], True
    for i, (r, n, e) in enumerate(zip(ref, new, ref64)):
        if not (isinstance(r, torch.Tensor) and r.is_floating_point() and r.numel()):
            continue
        e = e.double()
        own, err = (r.double() - e).abs().max().item(), (n.double() - e).abs().max().item()
        atol, rtol = TOLERANCES[torch.float32]
        bound = F64_SLACK * own + atol + rtol * e.abs().max().item()
        rows.append({"index": i, "float32_original_err": own, "rewrite_err": err, "bound": bound, "ok": err <= bound})
        ok &= err <= bound and math.isfinite(err)
    worst = max(rows, key=lambda r: r["rewrite_err"] / r["bound"], default=None)
    why = (f"output {worst['index']}: the rewrite is {worst['rewrite_err']:.3g} from the float64 result, the original "
           f"in float32 {worst['float32_original_err']:.3g} (bound {worst['bound']:.3g})") if worst else "no float output"
    return {"ok": ok, "slack": F64_SLACK, "why": why, "outputs": rows}


@contextlib.contextmanager
def _in_float64(module):
    """Swap every float32 parameter / buffer of `module` for a float64 copy; the very same float32 tensors are put
    back afterwards (also on error), so the module and anything sharing its tensors are unchanged."""
    saved = []
    try:
        for m in module.modules():
            for store in (m._parameters, m._buffers):
                for name, t in store.items():
                    if t is not None and t.dtype == torch.float32:
                        saved.append((t, t.data) if isinstance(t, nn.Parameter) else (store, name, t))
                        if isinstance(t, nn.Parameter):
                            t.data = t.data.double()
                        else:
                            store[name] = t.double()
        yield module
    finally:
        for entry in saved:
            if len(entry) == 2:
                entry[0].data = entry[1]
            else:
                entry[0][entry[1]] = entry[2]


def _free_bytes() -> int | None:
    """Available memory: Linux's MemAvailable, else free physical pages; None where the platform says neither."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
