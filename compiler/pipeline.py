"""compile = checkpoint -> capture -> fold / materialize -> ONNX (folded + unfused) -> parity -> report.

Everything is built in a temporary directory beside the output and swapped into place atomically
(tapernorm.fileio) only when the parity checks pass, so a failed or killed compile leaves the previous
output whole. The output directory is locked for the whole compile (a second compile into it fails at once,
naming the holder's PID); a recompile replaces only the files compile writes and keeps any others there.
The `compile` and `demo` commands that drive it are in cli.py.
"""
from __future__ import annotations

import functools
import gc
import inspect
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from tapernorm.data import Tokenizer
from tapernorm.fileio import canonical_out, dir_lock, is_swap_pointer, recover_dir, staged_dir
from tapernorm.layers import TAPER_TYPES, taper_layers
from tapernorm.passes import fold, materialize
from tapernorm.passes.capture import capture
from tapernorm.runtime.generate import OrtDecoder
from tapernorm.runtime.session import DecoderSession

from .export_onnx import (
    DTYPES, INLINE_LIMIT, KVCacheLM, dynamic_shapes, example_inputs, export_onnx, write_runtime_json,
)
from .defaults import DEFAULT_PROMPT, PARITY_TOKENS
from .hf_compile import load_for_compile
from .onnx_fold import check_statistics
from .onnx_io import load_onnx
from .onnx_stats import pos0_counts
from .lean import NEAREST, LeanError, spec_for, write_genai_config
from .lean.hf_arch import check_config
from .tokenizer_files import COPIED_FILES, copy_tokenizer_files, update_runtime_json
from .lean.export import export_lean_pair, optimized_counts
from .precision import apply_precision, plan_precision, precision_parity
from .lean.builder import build_lean
from .load import check_fits, checkpoint_dtype
from .stages import Stages

__all__ = ["compile_checkpoint", "CompileError", "ParityError", "ort_greedy", "torch_greedy", "summary_text",
           "DEFAULT_PROMPT", "PARITY_TOL"]

PARITY_TOL = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}  # max |logit diff| / max(1, max |logit|)
_OUT_FILES = ("model.onnx", "model_unfused.onnx", "runtime.json", "config.json", "compile_report.json")
# everything a compile may write into its output directory; anything else there belongs to the user
OWNED_FILES = (*_OUT_FILES, "model.onnx.data", "model_unfused.onnx.data", "genai_config.json", *COPIED_FILES)
# lean graphs with more weight bytes than this stream them into external data (`<file>.data`) tensor by tensor
# (an inline file holds them twice more: the ModelProto and its serialization), and skip the ORT node-count pass
LEAN_STREAM_ABOVE = 64 * 2**20
GRAPH_KINDS = ("lean", "generic")  # compile_checkpoint(graph=...): compiler.lean builder or the dynamo export


class CompileError(ValueError):
    """The checkpoint cannot be compiled as asked (gates not 0, bad output dir, ...)."""


class ParityError(RuntimeError):
    """ONNX and PyTorch disagree; the message carries the figures."""


# -- ORT / torch greedy loops (parity) ------------------------------------------------------------------
def ort_greedy(sess, prompt: list[int], n_new: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decode through the runtime's KV-cached OrtDecoder (empty past at step 0) on a DecoderSession;
    returns (tokens, float32 logits (V,) of every step)."""
    dec = OrtDecoder(sess)
    last = dec.start(np.asarray([prompt], dtype=np.int64))  # (1, V)
    tokens, logits_seen = [], []
    for i in range(n_new):
        logits_seen.append(last[0].astype(np.float32))
        tokens.append(int(logits_seen[-1].argmax()))
        if i < n_new - 1:
            last = dec.step(np.asarray(tokens[-1:], dtype=np.int64))
    return tokens, logits_seen


def _session(path: Path, provider: str, out_dir: Path):
    """A 1-thread runtime DecoderSession on a graph still in the build dir; errors name its final path."""
    try:
        return DecoderSession(path, provider=provider, intra_op_threads=1)
    except (ValueError, RuntimeError, OSError) as e:
        raise type(e)(str(e).replace(str(path.parent), str(out_dir))) from None


@torch.no_grad()
def torch_greedy(model, prompt: list[int], n_new: int, first_logits: dict | None = None
                 ) -> tuple[list[int], list[np.ndarray]]:
    """The same greedy loop on the PyTorch model (its own KV cache); `first_logits["logits"]` gets the first
    call's float32 logits of every prompt position (T, V) when a dict is given."""
    ids, past, pos, tokens, logits_seen = torch.tensor([prompt]), None, 0, [], []
    for _ in range(n_new):
        T = ids.shape[1]
        logits, past = model(ids, torch.ones(1, pos + T, dtype=torch.long), torch.arange(pos, pos + T)[None],
                             past, use_cache=True)
        if first_logits is not None and pos == 0:
            first_logits["logits"] = logits[0].float().numpy()
        last = logits[0, -1].float().numpy()
        logits_seen.append(last)
        pos += T
        tokens.append(int(last.argmax()))
        ids = torch.tensor([[tokens[-1]]])
    return tokens, logits_seen


def torch_reference(model, prompt: list[int], n_new: int) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    """PyTorch's side of parity: (greedy tokens, their float32 logits, full-prompt logits (T, V)); small enough
    to keep while the model itself is freed before onnxruntime loads the graphs."""
    first = {}
    ref_tokens, ref_logits = torch_greedy(model, prompt, n_new, first_logits=first)
    return ref_tokens, ref_logits, first["logits"]  # (T, V): every prompt position, from the first (empty-past) call


def _parity(model, cfg, sessions: dict, prompt: list[int], n_new: int, dtype: str) -> dict:
    """Prompt logits max |diff| vs PyTorch and greedy tokens for every session; raises ParityError.
    `model` is the PyTorch model or its torch_reference(...) triple."""
    ref_tokens, ref_logits, ref_full = model if isinstance(model, tuple) else torch_reference(model, prompt, n_new)
    scale = max(1.0, float(np.abs(ref_full).max()))
    out = {"prompt_tokens": len(prompt), "new_tokens": n_new, "torch_tokens": ref_tokens, "logit_scale": scale,
           "tolerance": PARITY_TOL[dtype] * scale, "graphs": {}}
    failures = []
    for name, sess in sessions.items():
        feeds = {"input_ids": np.asarray([prompt], np.int64), "attention_mask": np.ones((1, len(prompt)), np.int64),
                 "position_ids": np.arange(len(prompt), dtype=np.int64)[None],
                 **sess.empty_past_arrays(1)}  # empty past (1, H_kv, 0, D)
        feeds = {k: v for k, v in feeds.items() if k in sess.input_names}  # lean graphs take no position_ids
        full = sess.session.run(["logits"], feeds)[0][0].astype(np.float32)  # (T, V); lean: (1, V), the last one
        prompt_diff = float(np.abs(full - ref_full[-full.shape[0]:]).max())
        tokens, logits = ort_greedy(sess, prompt, n_new)
        agree = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
        steps = min(len(logits), agree if agree is not None else len(logits))
        step_diff = max((float(np.abs(a - b).max()) for a, b in zip(logits[:steps], ref_logits[:steps])), default=0.0)
        row = {"prompt_logits_max_abs_diff": prompt_diff, "decode_logits_max_abs_diff": step_diff,
               "tokens": tokens, "tokens_identical": agree is None, "first_mismatch": agree,
               "providers": sess.providers}
        out["graphs"][name] = row
        if not math.isfinite(prompt_diff) or prompt_diff > out["tolerance"] or step_diff > out["tolerance"]:
            failures.append(f"{name}: max |logit diff| prompt {prompt_diff:.3g}, decode {step_diff:.3g} "
                            f"> tol {out['tolerance']:.3g}")
        if agree is not None:
            failures.append(f"{name}: greedy token {agree} is {tokens[agree]} vs PyTorch {ref_tokens[agree]}")
    out["ok"] = not failures
    if failures:
        raise ParityError("parity failed (nothing written): " + "; ".join(failures))
    return out


# -- compile ---------------------------------------------------------------------------------------------
def _versions() -> dict:
    import onnxruntime as ort
    import onnxscript
    import onnx_graphsurgeon as gs
    from importlib.metadata import version
    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "onnxscript": onnxscript.__version__, "onnx_graphsurgeon": gs.__version__,
            "tapernorm": version("tapernorm"), "numpy": np.__version__}


def _check_gates(model, ckpt: Path, allow_unfolded: bool) -> list[str]:
    """Names of tapered layers whose gate is not exactly 0 (raises unless allow_unfolded)."""
    bad = [(n, m.gate) for n, m in taper_layers(model) if m.gate != 0.0]
    if bad and not allow_unfolded:
        shown = ", ".join(f"{n} (gate {g:g})" for n, g in bad[:6]) + (" ..." if len(bad) > 6 else "")
        raise CompileError(f"{ckpt}: TaperNorm gates are not 0 in {len(bad)} layer(s): {shown}; the fold is exact "
                           "only at gate 0 - finish the taper schedule, or pass --allow-unfolded to compile with "
                           "those norms kept (computed per token)")
    return [n for n, _ in bad]


def _prepare_out(out_dir: Path) -> list[str]:
    """Refuse an output path that is not a compile's; returns the names in a previous compile output that
    compile did not write (the user's files, carried into the new output)."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                       and not (out_dir / "compile_report.json").is_file())):
        raise CompileError(f"{out_dir} exists and is not a compiled model directory; pass --out with a new or empty "
                           "directory (a previous compile output is replaced, files of yours in it are kept)")
    return sorted(n for n in os.listdir(out_dir) if n not in OWNED_FILES) if out_dir.is_dir() else []


def _carry(src: Path, dst: Path) -> None:
    """Hard-link (else copy) the file or tree `src` to `dst`: the user's entries survive the swap."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(src, dst)


def _holding_out_lock(fn):
    """Run a compile holding its output directory's lock, after repairing what a killed compile left there."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def locked(*args, **kw):
        bound = sig.bind(*args, **kw)
        out = Path(bound.arguments["out_dir"])
        if out.is_symlink() and not is_swap_pointer(out):  # --out ALIAS -> DIR: swap DIR itself, under DIR's lock
            out = bound.arguments["out_dir"] = canonical_out(out)
        with dir_lock(out, f"tapernorm compile --out {out}"):
            recover_dir(out)
            return fn(*bound.args, **bound.kwargs)
    return locked


def _check_finite(model, cfg, ckpt: Path, dtype: str) -> None:
    """Refuse a model whose logits overflow (inf/nan) in `dtype`, before capture and verify see NaNs."""
    ids, mask, pos, _ = example_inputs(cfg, dtype=dtype)
    with torch.no_grad():
        logits = model(ids, mask[:, -ids.shape[1]:], pos - pos[:, :1])  # (B, T, V), no past
    if not torch.isfinite(logits).all():
        fix = ("compile with --dtype float32" if dtype != "float32"
               else "the weights are not finite; retrain or restore an earlier checkpoint")
        raise CompileError(f"{ckpt}: the model's logits are not finite in {dtype} (overflow or NaN weights); {fix}")


def _prompt_ids(info: dict, cfg, prompt: str) -> list[int]:
    tok_path = info.get("tokenizer_path")
    if tok_path:
        tok = Tokenizer.load(tok_path)
        ids = ([tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else []) + tok.encode(prompt)
    else:  # no tokenizer: a fixed, deterministic prompt of ids
        ids = [(7 * i + 3) % cfg.vocab_size for i in range(8)]
    return [i for i in ids if 0 <= i < cfg.vocab_size][: max(1, cfg.max_seq_len // 2)]


@_holding_out_lock
def compile_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, dtype: str = "float32",
                       allow_unfolded: bool = False, parity_tokens: int = PARITY_TOKENS, prompt: str = DEFAULT_PROMPT,
                       provider: str = "cpu", log=None, inline_limit: int = INLINE_LIMIT, graph: str = "lean",
                       fallback_generic: bool = False, precision: str = "fp32", block_size: int = 32,
                       accuracy_level: int | None = None, unfused: bool = False) -> dict:
    """Compile a checkpoint into `out_dir` (model.onnx, runtime.json, report; model_unfused.onnx with `unfused`);
    returns the report.

    `unfused`: also write model_unfused.onnx (the explicit gate-0 maps, for benchmarks and debugging) and check
    its parity too. Before anything is loaded, the expected peak memory is checked against what is available
    (compiler/load.py: CompileFitError with the estimate and the fix). Each stage logs one line with its time and
    peak RSS; the report's "stages" records them.
    `inline_limit`: weight bytes above which the ONNX files use external data (`<file>.data`; default ~1.9 GB;
    lean graphs stream theirs above LEAN_STREAM_ABOVE, 64 MiB, whatever the limit).
    `graph`: "lean" (compiler.lean: GroupQueryAttention, shared KV buffer, fused Skip norms; also writes
    genai_config.json) or "generic" (the torch.onnx dynamo export). A model the lean builder cannot express
    is a CompileError naming the layer, unless `fallback_generic` (then the generic export is used).
    `precision` fp16 / bf16 / int8 / int4 (compiler/precision.py): fold in fp32, then cast or quantize weight-only
    (`block_size`, `accuracy_level`: MatMulNBits); parity is then against the fp32 model with its tolerance.
    """
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    ckpt, out_dir = Path(checkpoint_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise CompileError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if parity_tokens < 1:
        raise CompileError(f"parity_tokens must be >= 1, got {parity_tokens}")
    if graph not in GRAPH_KINDS:
        raise CompileError(f"graph {graph!r} is not one of {list(GRAPH_KINDS)}")
    plan = plan_precision(precision, dtype, provider, block_size, accuracy_level)  # one-line refusals first
    if not (ckpt / "config.json").is_file() and (ckpt / "model" / "config.json").is_file():
        log(f"{ckpt} is a run directory; compiling its final model, {ckpt / 'model'}")  # as `tapernorm eval` does
        ckpt = ckpt / "model"
    foreign = _prepare_out(out_dir)
    stages = Stages(log)
    stages.begin("check", "memory estimate from the safetensors headers")
    fit = check_fits(ckpt, dtype)  # refuses before loading a model that would not fit; nothing written
    if fit is None:  # no safetensors there: the loader says what is wrong, in one line
        stages.cancel()
    ckpt_dtype = checkpoint_dtype(ckpt) if fit else None
    stages.begin("load", f"{ckpt_dtype or 'checkpoint'} weights")
    model, info = load_for_compile(ckpt, log)  # a run dir, a tapered HF dir or a FakeLN HF dir (hf_compile.py)
    hf_info = info.get("hf")
    if hf_info and graph == "lean":  # the lean builder maps every family with a spec (compiler/lean/families.py)
        near = NEAREST.get(hf_info["model_type"])
        if spec_for(hf_info["model_type"]) is None:
            hf_info["lean"] = (f"model_type {hf_info['model_type']!r}: no lean spec"
                               + (f" (nearest family: {near})" if near else "") + "; using --graph generic")
            log(hf_info["lean"])
            graph = "generic"
        else:  # a config value outside what the spec maps (rope type, activation): one line naming the key
            try:
                hf_cfg = model.hf.config
                check_config(spec_for(hf_info["model_type"]), getattr(hf_cfg, "get_text_config", lambda: hf_cfg)())
            except LeanError as e:
                hf_info["lean"] = f"{e}; using --graph generic"
                log(hf_info["lean"])
                graph = "generic"
        fallback_generic = True  # a feature GroupQueryAttention cannot express: one line, then the generic export
    cfg = model.config
    if parity_tokens >= cfg.max_seq_len:
        raise CompileError(f"--parity-tokens {parity_tokens} does not fit {ckpt}'s {cfg.max_seq_len}-token context; "
                           f"use at most {cfg.max_seq_len - 1}")
    unfolded = _check_gates(model, ckpt, allow_unfolded)
    model = model.to(DTYPES[dtype]).eval()  # the compute dtype; a no-op (no copy) when the checkpoint has it
    stages.begin("check-finite", f"{ckpt_dtype or 'checkpoint'} -> {dtype}")
    _check_finite(model, cfg, ckpt, dtype)
    wrapper = KVCacheLM(model)
    args, ds = example_inputs(cfg, dtype=dtype), dynamic_shapes(cfg.n_layers)
    log(f"capture {type(model).__name__} ({cfg.arch}, {cfg.taper_mode}, {dtype})")
    # the lean builder reads only weights and sites from the GraphModule: a static capture is several times faster
    # than a symbolic one; the generic export re-exports the GraphModule with dynamic shapes, so it needs them
    gm, gm_fold, rep_fold, gm_unf, rep_unf = _run_passes(wrapper, args, ds if graph == "generic" else None, unfused,
                                                         stages)
    variants = ("model.onnx", "model_unfused.onnx") if unfused else ("model.onnx",)
    t_pass = time.perf_counter()

    folded = sorted(n for n, r in rep_fold["layers"].items() if r["status"] == "folded")
    n_norms = len(taper_layers(model)) + sum(1 for m in model.modules()
                                             if (isinstance(m, (torch.nn.RMSNorm, torch.nn.LayerNorm))
                                                 or type(m).__name__.endswith("RMSNorm"))  # HF's own RMSNorms
                                             and not isinstance(m, TAPER_TYPES))
    stats_holder: dict = {}

    def annotate_folded(m: onnx.ModelProto) -> dict:
        stats = check_statistics(m, folded, expect_total=0 if len(folded) == n_norms else None)
        stats_holder["stats"] = stats
        return {"tapernorm.statistics_check": stats, "tapernorm.folded_layers": folded}

    with staged_dir(out_dir, "build") as tmp:
        stages.begin("build", f"{graph} graph, {', '.join(variants)}")
        meta = {"tapernorm.source": str(ckpt), "tapernorm.taper_mode": cfg.taper_mode}
        if graph == "lean":
            log("build lean model.onnx (folded) and model_unfused.onnx")
            try:
                exp_f, exp_u, stats = _export_lean(model, gm_fold, rep_fold, gm_unf, rep_unf, tmp,
                                                   DTYPES[plan.graph_dtype], meta, inline_limit)
            except LeanError as e:
                if not fallback_generic:
                    raise CompileError(f"{ckpt}: lean graph: {e}") from None
                log(f"lean graph not possible ({e}); using --graph generic")
                if hf_info:
                    hf_info["lean"] = str(e)
                graph = "generic"
                gm, gm_fold, rep_fold, gm_unf, rep_unf = _run_passes(wrapper, args, ds, unfused, stages)  # dynamic
                stages.begin("build", f"generic graph, {', '.join(variants)}")
        if graph == "generic":
            log("export model.onnx (folded)")
            exp_f = export_onnx(gm_fold, cfg, tmp / "model.onnx", dtype, metadata={**meta, "tapernorm.graph": "folded"},
                                annotate=annotate_folded, inline_limit=inline_limit)
            stats = stats_holder["stats"]
            exp_u = None
            if unfused:
                log("export model_unfused.onnx")
                exp_u = export_onnx(gm_unf, cfg, tmp / "model_unfused.onnx", dtype,
                                    metadata={**meta, "tapernorm.graph": "unfused"}, inline_limit=inline_limit)
            for f in variants:
                load_onnx(tmp / f, load_external_data=False)  # re-read what was written (IR, checker)
        if not stats["ok"]:
            raise ParityError(f"statistics check failed (nothing written): {stats['reason']}")
        t_export = time.perf_counter()
        stages.begin("files", "tokenizer, runtime.json")
        # runtime.json first: the runtime sessions of the parity check read the context limit from it
        toks = copy_tokenizer_files(ckpt, tmp, cfg.vocab_size)  # tokenizer files, chat template, stop ids, BOS rule
        tok_ids = {"eos_id": toks.eos_id, "bos_id": toks.bos_id}
        for note in toks.notes:
            log(f"note: {note}")
        shutil.copyfile(ckpt / "config.json", tmp / "config.json")
        prec = apply_precision(tmp, plan, graph, files=variants, log=log)  # int8/int4: MatMulNBits; generic fp16: cast
        write_runtime_json(tmp, cfg, plan.graph_dtype, **tok_ids)
        update_runtime_json(tmp, toks)  # eos_ids (every end token), add_bos, tokenizer file
        stages.begin("parity", f"{parity_tokens} greedy tokens, PyTorch vs ORT {' / '.join(variants)}")
        prompt_ids = _prompt_ids(info, cfg, prompt)[: cfg.max_seq_len - parity_tokens]  # prompt + new fit the context
        n_weights = sum(p.numel() * p.element_size() for p in model.parameters())
        if plan.precision == "fp32":  # PyTorch's answer first, then free its weights before ORT loads the graph
            ref = torch_reference(model, prompt_ids, parity_tokens)
            del model, wrapper, gm, gm_fold, gm_unf
            gc.collect()
            sessions = {f: _session(tmp / f, provider, out_dir) for f in variants}
            parity = _parity(ref, cfg, sessions, prompt_ids, parity_tokens, dtype)
        else:  # against the fp32 model: a tolerance per precision and a greedy-agreement rate
            sessions = {f: _session(tmp / f, provider, out_dir) for f in variants}
            parity = precision_parity(model, cfg, sessions, info, _prompt_ids, torch_greedy, parity_tokens, plan)
        del sessions
        stages.begin("finish", "genai_config.json, ORT node counts, report")
        if graph == "lean":  # onnxruntime-genai runs the same directory (runtime/genai_engine.py)
            write_genai_config(tmp, cfg, eos_id=tok_ids["eos_id"], bos_id=tok_ids["bos_id"], provider=provider,
                               eos_ids=toks.eos_ids)
        pos0 = {"sites": rep_fold.get("pos0_factors", 0),  # norms with position 0's own scale c0 (passes/pos0.py)
                **{f: pos0_counts(load_onnx(tmp / f, load_external_data=False)) for f in variants}}
        report = {
            "checkpoint": str(ckpt), "out_dir": str(out_dir), "dtype": plan.graph_dtype, "arch": cfg.arch, "graph": graph,
            "pos0": pos0,
            "precision": prec,
            "ort_optimized": optimized_counts(tmp) if n_weights <= LEAN_STREAM_ABOVE else {},  # writes a full copy
            "ort_optimized_skipped": None if n_weights <= LEAN_STREAM_ABOVE else
            f"weights over {LEAN_STREAM_ABOVE >> 20} MiB: ORT's optimized copy of the graph is not written",
            "taper_mode": cfg.taper_mode, "gate": info.get("gate"), "allow_unfolded": allow_unfolded, "hf": info.get("hf"),
            "unfolded_layers": unfolded, "folded_layers": folded, "tokenizer": toks.tokenizer is not None,
            "tokenizer_files": toks.files, "eos_ids": toks.eos_ids, "add_bos": toks.add_bos,
            "passes": {"fold": rep_fold, **({"materialize": rep_unf} if unfused else {})}, "statistics_check": stats,
            "export": {"model.onnx": exp_f, **({"model_unfused.onnx": exp_u} if unfused else {})}, "unfused": unfused,
            "checkpoint_dtype": ckpt_dtype, "compute_dtype": dtype,
            "fit_estimate": fit.__dict__ if fit else None,
            "opset": exp_f["opset"], "ir_version": exp_f["ir_version"],
            "providers": parity["graphs"]["model.onnx"]["providers"], "parity": parity,
            "versions": _versions(), "seconds": {"passes": round(t_pass - t0, 2), "export": round(t_export - t_pass, 2),
                                                 "total": round(time.perf_counter() - t0, 2)},
        }
        stages.end()
        report.update(stages.record())  # "stages": per-stage seconds and peak RSS, "peak_rss_bytes", "total_seconds"
        (tmp / "compile_report.json").write_text(json.dumps(report, indent=2, default=str))
        for name in foreign:  # the user's files in a previous output: kept, not deleted by the swap
            if not os.path.lexists(tmp / name):
                _carry(out_dir / name, tmp / name)
        if foreign:
            log(f"kept {len(foreign)} file(s) of yours in {out_dir}: {', '.join(foreign[:5])}"
                f"{' ...' if len(foreign) > 5 else ''}")
    return report


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
            + f"  parity: prompt logits max|diff| "
            + ", ".join(f"{_SHORT[f]} {g[f]['prompt_logits_max_abs_diff']:.2e}" for f in g) + "; "
            + (f"{p['new_tokens']} greedy tokens identical in PyTorch / {' / '.join(_SHORT[f] for f in g)}"
               if "precision" not in p else
               f"{rep['precision']['name']} vs fp32 PyTorch, greedy agreement "
               + ", ".join(f"{_SHORT[f]} {g[f]['greedy_agreement']:.0%}" for f in g)
               + f" over {p['prompts']} prompts x {p['new_tokens']} tokens")
            + (f"\n  {len(rep['stages'])} stages in {rep['total_seconds']:.1f} s, peak RSS "
               f"{rep['peak_rss_bytes'] / 2**30:.2f} GiB" if rep.get("stages") else ""))


_SHORT = {"model.onnx": "folded", "model_unfused.onnx": "unfused"}


def _run_passes(wrapper, args, ds, unfused: bool, stages: Stages):
    """capture -> fold (-> materialize with `unfused`), each a stage; `ds` None captures static shapes.
    Returns (gm, gm_fold, rep_fold, gm_unf, rep_unf); the unfused pair is None without `unfused`."""
    stages.begin("capture", "torch.export, " + ("dynamic shapes" if ds is not None else "static shapes"))
    gm = capture(wrapper, args, dynamic_shapes=ds)
    tapered = bool(taper_layers(wrapper))
    stages.begin("fold", "" if tapered else "no TaperNorm: nothing to verify (parity checks ORT vs PyTorch)")
    gm_fold, rep_fold = fold(gm, args, dynamic_shapes=ds, original=wrapper, verify=tapered)
    gm_unf = rep_unf = None
    if unfused:
        stages.begin("materialize", "--unfused")
        gm_unf, rep_unf = materialize(gm, args, dynamic_shapes=ds, original=wrapper)
    stages.end()
    return gm, gm_fold, rep_fold, gm_unf, rep_unf


def _export_lean(model, gm_fold, rep_fold: dict, gm_unf, rep_unf, out: Path, dtype: torch.dtype, meta: dict,
                 inline_limit: int) -> tuple[dict, dict | None, dict]:
    """The lean model.onnx (and model_unfused.onnx when gm_unf is given): (facts folded, facts unfused or None,
    statistics check of the folded graph)."""
    limit = min(inline_limit, LEAN_STREAM_ABOVE)
    if gm_unf is not None:
        return export_lean_pair(model, gm_fold, rep_fold, gm_unf, rep_unf, out, dtype, meta, limit)
    size = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    facts = build_lean(model, gm_fold, rep_fold, out / "model.onnx", dtype, {**meta, "tapernorm.graph": "folded"},
                       external_data=size > limit)
    load_onnx(out / "model.onnx", load_external_data=False)  # re-read what was written (IR, checker)
    return facts, None, facts["statistics_check"]
