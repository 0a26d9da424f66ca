"""Verify a rewritten module against reference outputs: max abs diff per output, dtype-aware tolerance."""
from __future__ import annotations

import math

import torch
import torch.utils._pytree as pytree

__all__ = ["VerifyError", "TOLERANCES", "run_outputs", "compare_outputs"]


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
