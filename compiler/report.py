"""compile_report.json: what a compile did, and the few lines `tapernorm compile` prints from it."""
from __future__ import annotations

import platform

import numpy as np
import onnx
import torch

__all__ = ["compile_report", "summary_text", "versions"]


def versions() -> dict:
    """The versions a compile report records."""
    import onnxruntime as ort
    import onnxscript
    import onnx_graphsurgeon as gs
    from importlib.metadata import version
    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "onnxscript": onnxscript.__version__, "onnx_graphsurgeon": gs.__version__,
            "tapernorm": version("tapernorm"), "numpy": np.__version__}



def compile_report(*, ckpt, out_dir, cfg, plan, built, parity: dict, pos0: dict, prec: dict, toks, info: dict,
                   unfolded: list[str], allow_unfolded: bool, unfused: bool, fit, ckpt_dtype, dtype: str,
                   ort_optimized: dict, skipped: str | None, seconds: dict) -> dict:
    """The report dict (its keys are the compile_report.json format; tests and benchmarks read them)."""
    p = built.passes
    return {
        "checkpoint": str(ckpt), "out_dir": str(out_dir), "dtype": plan.graph_dtype, "arch": cfg.arch,
        "graph": built.graph, "pos0": pos0, "precision": prec,
        "ort_optimized": ort_optimized, "ort_optimized_skipped": skipped,
        "taper_mode": cfg.taper_mode, "gate": info.get("gate"), "allow_unfolded": allow_unfolded, "hf": info.get("hf"),
        "unfolded_layers": unfolded, "folded_layers": p.folded, "tokenizer": toks.tokenizer is not None,
        "tokenizer_files": toks.files, "eos_ids": toks.eos_ids, "add_bos": toks.add_bos,
        "passes": {"fold": p.rep_fold, **({"materialize": p.rep_unf} if unfused else {})},
        "statistics_check": built.stats,
        "export": {"model.onnx": built.export_folded,
                   **({"model_unfused.onnx": built.export_unfused} if unfused else {})}, "unfused": unfused,
        "checkpoint_dtype": ckpt_dtype, "compute_dtype": dtype, "fit_estimate": fit.__dict__ if fit else None,
        "opset": built.export_folded["opset"], "ir_version": built.export_folded["ir_version"],
        "providers": parity["graphs"]["model.onnx"]["providers"], "parity": parity,
        "versions": versions(), "seconds": seconds,
    }


def summary_text(rep: dict) -> str:
    """The few lines `tapernorm compile` prints: output, folds, statistics check, parity."""
    p = rep["parity"]
    g = p["graphs"]
    return (f"compiled {rep['checkpoint']} -> {rep['out_dir']} ({rep['dtype']}, opset {rep['opset'].get('ai.onnx')}, "
            f"IR {rep['ir_version']}, providers {rep['providers']})\n"
            f"  graph {rep.get('graph', 'generic')}: "
            + (", ".join(f"{f} {c['nodes']} ORT nodes" for f, c in rep["ort_optimized"].items())
               + " (after onnxruntime's optimization)\n" if rep.get("ort_optimized") else
               f"ORT node counts skipped ({rep.get('ort_optimized_skipped')})\n")
            + f"  folded {len(rep['folded_layers'])} norm(s); statistics check: "
            f"{'ok' if rep['statistics_check']['ok'] else rep['statistics_check']['reason']} "
            f"({rep['statistics_check']['total']} statistic ops left in model.onnx)\n"
            + (f"  position 0's own scale: {rep['pos0']['sites']} norm(s), {rep['pos0']['model.onnx']['muls']} "
               "per-token Mul(s) in model.onnx (1 at every position but 0)\n" if rep.get("pos0", {}).get("sites") else "")
            + (f"  bounded maps: {rep['bound']['sites']} norm(s) taper to B tanh(x c / B) (B {_bounds(rep['bound'])}), "
               f"{rep['bound']['model.onnx']['tanh']} Tanh in model.onnx\n" if rep.get("bound", {}).get("sites") else "")
            + "  parity: prompt logits max|diff| "
            + ", ".join(f"{_SHORT[f]} {g[f]['prompt_logits_max_abs_diff']:.2e}" for f in g) + "; "
            + (f"{p['new_tokens']} greedy tokens identical in PyTorch / {' / '.join(_SHORT[f] for f in g)}"
               if "precision" not in p else
               f"{rep['precision']['name']} vs fp32 PyTorch, greedy agreement "
               + ", ".join(f"{_SHORT[f]} {g[f]['greedy_agreement']:.0%}" for f in g)
               + f" over {p['prompts']} prompts x {p['new_tokens']} tokens")
            + (f"\n  {len(rep['stages'])} stages in {rep['total_seconds']:.1f} s, peak RSS "
               f"{rep['peak_rss_bytes'] / 2**30:.2f} GiB" if rep.get("stages") else ""))


_SHORT = {"model.onnx": "folded", "model_unfused.onnx": "unfused"}


def _bounds(b: dict) -> str:
    """The summary's bound: the scalar Bs, and how many norms have a B per feature."""
    parts = [", ".join(f"{x:g}" for x in b["bound"])] if b["bound"] else []
    if b.get("per_feature"):
        parts.append(f"per feature at {b['per_feature']}")
    return "; ".join(parts)
