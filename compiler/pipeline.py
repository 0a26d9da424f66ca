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
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tapernorm.fileio import canonical_out, dir_lock, is_swap_pointer, recover_dir, staged_dir
from tapernorm.layers import taper_layers

from .build import LEAN_STREAM_ABOVE, Built, build_graphs, run_passes
from .defaults import DEFAULT_PROMPT, PARITY_TOKENS
from .export_onnx import DTYPES, INLINE_LIMIT, KVCacheLM, dynamic_shapes, example_inputs, write_runtime_json
from .hf_compile import load_for_compile
from .lean import NEAREST, LeanError, spec_for, write_genai_config
from .lean.export import optimized_counts
from .lean.hf_arch import check_config
from .load import available_memory, check_fits, checkpoint_dtype
from .onnx_io import load_onnx
from .onnx_stats import bound_counts, pos0_counts
from .parity import (PARITY_TOL, ParityError, check_parity, open_session, ort_greedy, prompt_ids, torch_greedy,
                     torch_reference)
from .precision import PrecisionPlan, apply_precision, plan_precision, precision_parity
from .report import compile_report, summary_text
from .stages import Stages
from .tokenizer_files import COPIED_FILES, copy_tokenizer_files, update_runtime_json

__all__ = ["compile_checkpoint", "CompileError", "ParityError", "ort_greedy", "torch_greedy", "summary_text",
           "DEFAULT_PROMPT", "PARITY_TOL", "OWNED_FILES", "LEAN_STREAM_ABOVE"]

_OUT_FILES = ("model.onnx", "model_unfused.onnx", "runtime.json", "config.json", "compile_report.json")
# everything a compile may write into its output directory; anything else there belongs to the user
OWNED_FILES = (*_OUT_FILES, "model.onnx.data", "model_unfused.onnx.data", "genai_config.json", *COPIED_FILES)
GRAPH_KINDS = ("lean", "generic")  # compile_checkpoint(graph=...): compiler.lean builder or the dynamo export


class CompileError(ValueError):
    """The checkpoint cannot be compiled as asked (gates not 0, bad output dir, ...)."""


# -- compile ---------------------------------------------------------------------------------------------
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


@dataclass
class CompileJob:
    """One compile's request, checked: checkpoint and output, compute dtype, precision plan, graph kind (the
    load stage may switch it to generic, saying why) and the parity settings."""
    ckpt: Path
    out_dir: Path
    dtype: str
    plan: PrecisionPlan
    graph: str
    fallback_generic: bool
    unfused: bool
    allow_unfolded: bool
    inline_limit: int
    provider: str
    parity_tokens: int
    prompt: str
    log: Callable[[str], None]

    @property
    def variants(self) -> tuple[str, ...]:
        """The ONNX files this compile writes."""
        return ("model.onnx", "model_unfused.onnx") if self.unfused else ("model.onnx",)


def _check_args(dtype: str, parity_tokens: int, graph: str) -> None:
    """One-line refusals of bad arguments, before anything is read."""
    if dtype not in DTYPES:
        raise CompileError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if parity_tokens < 1:
        raise CompileError(f"parity_tokens must be >= 1, got {parity_tokens}")
    if graph not in GRAPH_KINDS:
        raise CompileError(f"graph {graph!r} is not one of {list(GRAPH_KINDS)}")


def _model_dir(ckpt: Path, log) -> Path:
    """A run directory compiles its final model, as `tapernorm eval` does."""
    if not (ckpt / "config.json").is_file() and (ckpt / "model" / "config.json").is_file():
        log(f"{ckpt} is a run directory; compiling its final model, {ckpt / 'model'}")
        return ckpt / "model"
    return ckpt


def _choose_graph(job: CompileJob, model, hf_info: dict | None) -> None:
    """An HF model builds lean only when its family has a spec (compiler/lean/families.py) and its config stays
    inside what the spec maps; otherwise job.graph becomes generic with one line saying why. A feature
    GroupQueryAttention cannot express is found while building: HF models then fall back to generic too."""
    if not hf_info or job.graph != "lean":
        return
    job.fallback_generic = True
    spec, near = spec_for(hf_info["model_type"]), NEAREST.get(hf_info["model_type"])
    if spec is None:
        why = f"model_type {hf_info['model_type']!r}: no lean spec" + (f" (nearest family: {near})" if near else "")
    else:  # a config value outside what the spec maps (rope type, activation): one line naming the key
        try:
            hf_cfg = model.hf.config
            check_config(spec, getattr(hf_cfg, "get_text_config", lambda: hf_cfg)())
            return
        except LeanError as e:
            why = str(e)
    hf_info["lean"] = f"{why}; using --graph generic"
    job.log(hf_info["lean"])
    job.graph = "generic"


def _load(job: CompileJob, stages: Stages):
    """check (the memory estimate refuses before loading) -> load -> gates -> compute dtype -> finite logits.
    Returns (model in eval mode, load info, fit estimate or None, checkpoint dtype or None, unfolded layers)."""
    stages.begin("check", "memory estimate from the safetensors headers")
    fit = check_fits(job.ckpt, job.dtype)  # refuses before loading a model that would not fit; nothing written
    if fit is None:  # no safetensors there: the loader says what is wrong, in one line
        stages.cancel()
    ckpt_dtype = checkpoint_dtype(job.ckpt) if fit else None
    stages.begin("load", f"{ckpt_dtype or 'checkpoint'} weights")
    model, info = load_for_compile(job.ckpt, job.log)  # a run dir, a tapered HF dir or a FakeLN HF dir
    _choose_graph(job, model, info.get("hf"))
    cfg = model.config
    if job.parity_tokens >= cfg.max_seq_len:
        raise CompileError(f"--parity-tokens {job.parity_tokens} does not fit {job.ckpt}'s {cfg.max_seq_len}-token "
                           f"context; use at most {cfg.max_seq_len - 1}")
    unfolded = _check_gates(model, job.ckpt, job.allow_unfolded)
    model = model.to(DTYPES[job.dtype]).eval()  # the compute dtype; a no-op (no copy) when the checkpoint has it
    stages.begin("check-finite", f"{ckpt_dtype or 'checkpoint'} -> {job.dtype}")
    _check_finite(model, cfg, job.ckpt, job.dtype)
    return model, info, fit, ckpt_dtype, unfolded


def _build(job: CompileJob, model, wrapper, args, ds, passes, tmp: Path, info: dict, stages: Stages) -> Built:
    """The ONNX graphs in the staging dir; a statistics check that fails is a ParityError (nothing written)."""
    meta = {"tapernorm.source": str(job.ckpt), "tapernorm.taper_mode": model.config.taper_mode}
    try:
        built = build_graphs(model, wrapper, args, ds, passes, tmp, graph=job.graph, dtype=job.dtype,
                             graph_dtype=DTYPES[job.plan.graph_dtype], meta=meta, inline_limit=job.inline_limit,
                             fallback_generic=job.fallback_generic, stages=stages, log=job.log)
    except LeanError as e:
        raise CompileError(f"{job.ckpt}: lean graph: {e}") from None
    if built.lean_error and info.get("hf"):
        info["hf"]["lean"] = built.lean_error
    if not built.stats["ok"]:
        raise ParityError(f"statistics check failed (nothing written): {built.stats['reason']}")
    return built


def _write_files(job: CompileJob, tmp: Path, cfg, graph: str, stages: Stages):
    """Tokenizer files, config.json, the precision step (int8/int4: MatMulNBits; generic fp16: cast) and
    runtime.json, which the parity sessions read the context limit from. Returns (tokenizer facts, precision)."""
    stages.begin("files", "tokenizer, runtime.json")
    toks = copy_tokenizer_files(job.ckpt, tmp, cfg.vocab_size)  # tokenizer files, chat template, stop ids, BOS rule
    for note in toks.notes:
        job.log(f"note: {note}")
    shutil.copyfile(job.ckpt / "config.json", tmp / "config.json")
    prec = apply_precision(tmp, job.plan, graph, files=job.variants, log=job.log)
    write_runtime_json(tmp, cfg, job.plan.graph_dtype, eos_id=toks.eos_id, bos_id=toks.bos_id)
    update_runtime_json(tmp, toks)  # eos_ids (every end token), add_bos, tokenizer file
    return toks, prec


def _float64_reference(job: CompileJob, ids: list[int], f32_bytes: int):
    """A callable for check_parity's second opinion: the checkpoint loaded again, in float64, through the same
    greedy decode; (None, why) when its float64 copy would not fit in the memory available."""
    def run():
        avail, source = available_memory()
        if avail is not None and 2.5 * f32_bytes > avail:  # the float64 weights beside the ORT sessions still open
            return None, f"a float64 copy needs {2 * f32_bytes / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB free ({source})"
        job.log("fp32 parity missed: asking PyTorch in float64 (the float32 reference may be what rounding decided)")
        model = load_for_compile(job.ckpt)[0].to(torch.float64).eval()
        try:
            return torch_reference(model, ids, job.parity_tokens), ""
        finally:
            del model
            gc.collect()
    return run


def _check_graphs(job: CompileJob, tmp: Path, cfg, reference, info: dict, ids: list[int], toks,
                  reference64=None) -> dict:
    """Parity of every written graph through the runtime's sessions. `reference` is torch_reference's triple
    (fp32: exact greedy identity; `reference64` the float64 second opinion) or the fp32 model (other precisions: a
    tolerance and a greedy-agreement rate)."""
    sessions = {f: open_session(tmp / f, job.provider, job.out_dir) for f in job.variants}
    if isinstance(reference, tuple):
        return check_parity(reference, cfg, sessions, ids, job.parity_tokens, job.dtype, reference64)
    ids_of = functools.partial(prompt_ids, toks=toks)
    return precision_parity(reference, cfg, sessions, info, ids_of, torch_greedy, job.parity_tokens, job.plan)


def _keep_foreign(out_dir: Path, tmp: Path, foreign: list[str], log) -> None:
    """The user's files in a previous output: carried into the new one, not deleted by the swap."""
    for name in foreign:
        if not os.path.lexists(tmp / name):
            _carry(out_dir / name, tmp / name)
    if foreign:
        log(f"kept {len(foreign)} file(s) of yours in {out_dir}: {', '.join(foreign[:5])}"
            f"{' ...' if len(foreign) > 5 else ''}")


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
    _check_args(dtype, parity_tokens, graph)
    plan = plan_precision(precision, dtype, provider, block_size, accuracy_level)  # one-line refusals first
    job = CompileJob(_model_dir(Path(checkpoint_dir), log), Path(out_dir), dtype, plan, graph, fallback_generic,
                     unfused, allow_unfolded, inline_limit, provider, parity_tokens, prompt, log)
    foreign = _prepare_out(job.out_dir)
    stages = Stages(log)
    model, info, fit, ckpt_dtype, unfolded = _load(job, stages)
    cfg, wrapper = model.config, KVCacheLM(model)
    args, ds = example_inputs(cfg, dtype=dtype), dynamic_shapes(cfg.n_layers)
    log(f"capture {type(model).__name__} ({cfg.arch}, {cfg.taper_mode}, {dtype})")
    # the lean builder reads only weights and sites from the GraphModule: a static capture is several times faster
    # than a symbolic one; the generic export re-exports the GraphModule with dynamic shapes, so it needs them
    passes = run_passes(wrapper, args, ds if job.graph == "generic" else None, unfused, stages)
    t_pass = time.perf_counter()
    with staged_dir(job.out_dir, "build") as tmp:
        built = _build(job, model, wrapper, args, ds, passes, tmp, info, stages)
        passes, t_export = None, time.perf_counter()
        toks, prec = _write_files(job, tmp, cfg, built.graph, stages)
        stages.begin("parity", f"{parity_tokens} greedy tokens, PyTorch vs ORT {' / '.join(job.variants)}")
        ids = prompt_ids(info, cfg, prompt, toks)[: cfg.max_seq_len - parity_tokens]  # prompt + new tokens fit the context
        n_weights = sum(p.numel() * p.element_size() for p in model.parameters())
        reference, reference64 = model, None
        if plan.precision == "fp32":  # PyTorch's answer first, then free its weights before ORT loads the graphs
            reference = torch_reference(model, ids, parity_tokens)
            reference64 = _float64_reference(job, ids, n_weights) if dtype == "float32" else None
            model = wrapper = None
            built.passes.release()
            gc.collect()
        parity = _check_graphs(job, tmp, cfg, reference, info, ids, toks, reference64)
        stages.begin("finish", "genai_config.json, ORT node counts, report")
        if built.graph == "lean":  # onnxruntime-genai runs the same directory (runtime/genai_engine.py)
            write_genai_config(tmp, cfg, eos_id=toks.eos_id, bos_id=toks.bos_id, provider=provider,
                               eos_ids=toks.eos_ids)
        graphs = {f: load_onnx(tmp / f, load_external_data=False) for f in job.variants}  # structure only
        pos0 = {"sites": built.passes.rep_fold.get("pos0_factors", 0),  # norms with position 0's own c0 (passes/pos0)
                **{f: pos0_counts(m) for f, m in graphs.items()}}
        small = n_weights <= LEAN_STREAM_ABOVE
        report = compile_report(
            ckpt=job.ckpt, out_dir=job.out_dir, cfg=cfg, plan=plan, built=built, parity=parity, pos0=pos0, prec=prec,
            toks=toks, info=info, unfolded=unfolded, allow_unfolded=allow_unfolded, unfused=unfused, fit=fit,
            ckpt_dtype=ckpt_dtype, dtype=dtype, ort_optimized=optimized_counts(tmp) if small else {},  # a full copy
            skipped=None if small else f"weights over {LEAN_STREAM_ABOVE >> 20} MiB: ORT's optimized copy of the "
                                       "graph is not written",
            seconds={"passes": round(t_pass - t0, 2), "export": round(t_export - t_pass, 2),
                     "total": round(time.perf_counter() - t0, 2)})
        stages.end()
        report["bound"] = bound_counts(built.passes.rep_fold, graphs)
        report.update(stages.record())  # "stages": per-stage seconds and peak RSS, "peak_rss_bytes", "total_seconds"
        (tmp / "compile_report.json").write_text(json.dumps(report, indent=2, default=str))
        _keep_foreign(job.out_dir, tmp, foreign, log)
    return report
