"""An onnxruntime session over a compiled tapernorm model directory.

A compiled dir holds `model.onnx` (folded), `model_unfused.onnx`, `tokenizer.model`, `config.json`,
`compile_report.json` and `runtime.json` ({"n_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
"max_seq_len", "dtype", "eos_id", "bos_id", "eos_ids", "add_bos", "tokenizer"}). The graph has the HF / onnxruntime-genai interface:

    inputs   input_ids (B, T) int64, attention_mask (B, P+T) int64, position_ids (B, T) int64,
             past_key_values.{i}.key|value (B, H, P, D)
    outputs  logits (B, T, V), present.{i}.key|value (B, H, P+T, D)

Providers: "cuda" is used only when the CUDA execution provider actually loads (checked with
`session.get_providers()` after creation, since onnxruntime-gpu silently falls back to CPU on a
machine without a GPU); what was used is in `DecoderSession.providers`.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

__all__ = ["DecoderSession", "RuntimeConfig", "ModelDirError", "resolve_model_path", "cuda_loadable",
           "ORT_DTYPES", "GRAPH_OPT_LEVELS"]

MODEL_FILES = ("model.onnx", "model_unfused.onnx")
GRAPH_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_IR_RE = re.compile(r"Unsupported model IR version:\s*(\d+),\s*max supported IR version:\s*(\d+)")


class ModelDirError(ValueError):
    """A path is not a loadable compiled tapernorm model."""


class _MixedFiles(ModelDirError):
    """runtime.json disagrees with the graph (DecoderSession retries once: a recompile may have swapped the dir)."""


MAX_CONTEXT = 1 << 20  # tokens; a larger max_seq_len is a corrupt value, not a model this runtime serves
_INT_RANGES = {"n_layers": (1, 4096), "num_heads": (1, 65536), "num_kv_heads": (1, 65536),
               "n_heads": (1, 65536),  # files before the explicit heads: the cache's heads
               "head_dim": (1, 65536), "vocab_size": (1, 1 << 24),
               "max_seq_len": (1, MAX_CONTEXT)}


def check_runtime_fields(data: dict, where: Path) -> None:
    """One-line ModelDirError for a runtime.json (or config.json) value of the wrong type or out of range."""
    fix = "re-run `tapernorm compile` to rewrite it"
    for k, (lo, hi) in _INT_RANGES.items():
        v = data.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise ModelDirError(f"{where}: {k} is {v!r} ({type(v).__name__}) but must be an integer; {fix}")
        if not lo <= v <= hi:
            raise ModelDirError(f"{where}: {k} = {v} is outside [{lo}, {hi}]; {fix}")
    if "dtype" in data and data["dtype"] not in ("float32", "float16", "bfloat16"):
        raise ModelDirError(f"{where}: dtype {data['dtype']!r} is not float32, float16 or bfloat16; {fix}")
    for k in ("eos_id", "bos_id"):
        v = data.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < -1
                              or (isinstance(data.get("vocab_size"), int) and v >= data["vocab_size"])):
            raise ModelDirError(f"{where}: {k} is {v!r} but must be null, -1 or a token id below vocab_size "
                                f"{data.get('vocab_size')}; {fix}")
    eos = data.get("eos_ids")
    if eos is not None:
        vocab = data.get("vocab_size") if isinstance(data.get("vocab_size"), int) else None
        bad = not isinstance(eos, list) or next((e for e in eos if isinstance(e, bool) or not isinstance(e, int)
                                                 or e < 0 or (vocab is not None and e >= vocab)), None) is not None
        if bad:
            raise ModelDirError(f"{where}: eos_ids is {eos!r} but must be a list of token ids below vocab_size "
                                f"{data.get('vocab_size')}; {fix}")
    if data.get("add_bos") is not None and not isinstance(data["add_bos"], bool):
        raise ModelDirError(f"{where}: add_bos is {data['add_bos']!r} but must be true, false or null; {fix}")
    if data.get("tokenizer") not in (None, "tokenizer.json", "tokenizer.model"):
        raise ModelDirError(f"{where}: tokenizer is {data['tokenizer']!r} but must be \"tokenizer.json\", "
                            f"\"tokenizer.model\" or null; {fix}")


@dataclass
class RuntimeConfig:
    """What the decode loop needs to know about a compiled model (runtime.json, checked against the graph)."""
    n_layers: int
    num_kv_heads: int  # the heads the KV cache holds (the past inputs' dim 1)
    head_dim: int
    vocab_size: int
    max_seq_len: int | None = None
    num_heads: int | None = None  # query heads (informational: the graph computes them)
    dtype: str = "float32"
    eos_id: int | None = None
    bos_id: int | None = None
    eos_ids: list[int] | None = None  # every end token (eos_id is the first; files before issue 18 have only it)
    add_bos: bool | None = None
    tokenizer: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def _swap_leftover(p: Path) -> Path | None:
    """The complete directory a compile killed in the middle of its swap left beside a missing `p` (the naming of
    tapernorm.fileio's no-exchange swap: `.NAME.lnk-*` points at the new version, `.NAME.old-*` is the previous
    one), newest first; None if there is none. Read-only: the next compile into `p` puts it back in place."""
    try:
        names = os.listdir(p.parent)
    except OSError:
        return None
    for tag in ("lnk", "old"):
        found = [p.parent / n for n in names if n.startswith(f".{p.name}.{tag}-") and (p.parent / n).is_dir()]
        if found:
            return max(found, key=lambda x: x.lstat().st_mtime_ns)
    return None


def resolve_model_path(path: str | os.PathLike, variant: str = "model.onnx") -> tuple[Path, Path]:
    """(model dir, onnx file) for a compiled dir or a direct .onnx path; one-line errors otherwise. A directory a
    killed compile left missing is read from the complete version beside it (with a warning)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".onnx":
        return p.parent, p
    if not p.exists() and _swap_leftover(Path(os.path.abspath(p))) is not None:
        found = _swap_leftover(Path(os.path.abspath(p)))
        warnings.warn(f"{p} is missing: a compile into it was killed while swapping the new output in; reading the "
                      f"complete output beside it ({found.name}). Re-running that compile (or any compile into {p}) "
                      "puts it back in place", RuntimeWarning, stacklevel=2)
        p = found
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; pass a directory written by `tapernorm compile CHECKPOINT --out DIR`")
    if not p.is_dir():
        raise ModelDirError(f"{p} is neither a compiled model directory nor an .onnx file; "
                            "pass a directory written by `tapernorm compile`")
    onnx_path = p / variant
    if not onnx_path.is_file():
        present = [f for f in MODEL_FILES if (p / f).is_file()]
        if not present:
            raise ModelDirError(f"{p} is not a compiled tapernorm model (no {' or '.join(MODEL_FILES)}); "
                                f"run `tapernorm compile CHECKPOINT --out {p}` first")
        raise FileNotFoundError(f"{onnx_path} is missing (the directory has {present}); re-run `tapernorm compile` "
                                f"or pick another variant")
    if onnx_path.stat().st_size == 0:
        raise ModelDirError(f"{onnx_path} is empty (truncated); re-run `tapernorm compile` to rewrite it")
    return p, onnx_path


_ROTARY_SCAN_LIMIT = 64 << 20  # bytes: larger graphs with inline weights are not parsed again for this check


def _rotary_rows(onnx_path: Path) -> int | None:
    """Rows of the graph's rotary cos cache (an initializer named *cos_cache), read with the onnx package when it is
    installed and the graph file is small (weights in external data); None otherwise."""
    try:
        if onnx_path.stat().st_size > _ROTARY_SCAN_LIMIT:
            return None
        import onnx
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # no onnx package, or unreadable here (onnxruntime already loaded it)
        return None
    rows = [int(t.dims[0]) for t in model.graph.initializer if t.name.endswith("cos_cache") and len(t.dims) == 2]
    return min(rows) if rows else None


def _config_context(cfg_path: Path) -> int | None:
    """The context length a compiled dir's config.json gives (ours: tapernorm.max_seq_len; HF's fields)."""
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    sub = cfg.get("tapernorm") if isinstance(cfg.get("tapernorm"), dict) else {}
    for v in (sub.get("max_seq_len"), cfg.get("max_position_embeddings"), cfg.get("n_positions")):
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def cuda_loadable() -> bool:
    """True when onnxruntime lists the CUDA provider and a CUDA driver library can be opened."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(lib)
            return True
        except OSError:
            continue
    return False


def _providers_for(provider: str, device_id: int) -> list:
    """The provider list to request for 'auto' | 'cpu' | 'cuda'."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda" or (provider == "auto" and cuda_loadable()):
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    if provider == "auto":
        return ["CPUExecutionProvider"]
    raise ValueError(f"provider {provider!r} is not one of 'auto', 'cpu', 'cuda'")


def _load_error(onnx_path: Path, err: Exception) -> Exception:
    """Turn an onnxruntime load failure into one line naming the file and the fix."""
    msg = str(err)
    m = _IR_RE.search(msg)
    if m:
        return ModelDirError(
            f"{onnx_path} has ONNX IR version {m.group(1)} but onnxruntime {ort.__version__} accepts at most "
            f"{m.group(2)}; re-export with model.ir_version = {m.group(2)} or upgrade onnxruntime")
    first = " ".join(msg.strip().split())[:300]
    if "xternal data" in msg:
        return ModelDirError(f"{onnx_path}: its external weights file is missing or unreadable ({first}); copy "
                             f"{onnx_path.name}.data beside it or re-run `tapernorm compile`")
    if "NOT_IMPLEMENTED" in msg or "Could not find an implementation" in msg:
        return ModelDirError(f"{onnx_path}: onnxruntime's providers have no kernel for an op in this graph ({first}); "
                             "bfloat16 has no CPU kernels - compile with --dtype float32/float16, or run on a GPU "
                             "with --provider cuda")
    if "rotobuf" in msg or "No graph" in msg or "model_proto" in msg or "ModelProto" in msg:
        return ModelDirError(f"{onnx_path} is truncated or not an ONNX model ({first}); "
                             f"re-run `tapernorm compile` to rewrite it")
    return ModelDirError(f"onnxruntime could not load {onnx_path} ({first}); the file may be truncated or corrupt, "
                         f"re-run `tapernorm compile`")


class DecoderSession:
    """An ORT InferenceSession over one exported decoder graph, with explicit threads and providers."""

    def __init__(self, path: str | os.PathLike, *, variant: str = "model.onnx", provider: str = "auto",
                 intra_op_threads: int | None = None, inter_op_threads: int = 1,
                 graph_optimization: str = "all", spinning: bool | None = None, profile: bool = False,
                 profile_prefix: str | None = None, optimized_model_path: str | None = None,
                 device_id: int = 0, log_severity: int = 3):
        self.model_dir, self.model_path = resolve_model_path(path, variant)
        if graph_optimization not in GRAPH_OPT_LEVELS:
            raise ValueError(f"graph_optimization {graph_optimization!r} is not one of {sorted(GRAPH_OPT_LEVELS)}")
        so = ort.SessionOptions()
        # threads are always explicit: on a shared machine ORT's default (all cores, spinning) is noisy
        self.intra_op_threads = int(intra_op_threads or max(1, os.cpu_count() or 1))
        self.inter_op_threads = int(inter_op_threads)
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = GRAPH_OPT_LEVELS[graph_optimization]
        so.log_severity_level = int(log_severity)
        if spinning is not None:
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if optimized_model_path:
            so.optimized_model_filepath = str(optimized_model_path)
        if profile:
            so.enable_profiling = True
            if profile_prefix:
                so.profile_file_prefix = str(profile_prefix)
        self.requested_provider = provider
        requested = _providers_for(provider, device_id)
        for attempt in (1, 2):  # a recompile may swap the directory between the graph and runtime.json: retry once
            try:
                self._open(so, requested, provider, device_id)
                break
            except _MixedFiles:
                if attempt == 2:
                    raise
                self.model_dir, self.model_path = resolve_model_path(path, variant)

    def _open(self, so, requested: list, provider: str, device_id: int) -> None:
        """Create the ORT session, check its interface and read runtime.json (one consistent compile)."""
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=so, providers=requested)
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidProtobuf, ...)
            raise _load_error(self.model_path, e) from None
        self.providers: list[str] = self.session.get_providers()
        self.device = "cuda" if self.providers and self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.device_id = device_id if self.device == "cuda" else 0
        if provider == "cuda" and self.device != "cuda":
            warnings.warn(f"provider 'cuda' was requested but the CUDA execution provider did not load; "
                          f"running on {self.providers}", RuntimeWarning, stacklevel=2)
        self._check_interface()
        self.config = self._load_config()

    # -- interface ------------------------------------------------------------------------------
    def _check_interface(self) -> None:
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = [o.name for o in self.session.get_outputs()]
        meta = self.session.get_modelmeta().custom_metadata_map
        # lean graphs (compiler.lean): one max-length KV buffer shared by past and present (GroupQueryAttention),
        # positions derived from the mask, logits of the last position only; decoded by SharedKVDecoder
        self.kv_shared = meta.get("tapernorm.kv_cache") == "shared"
        self.graph_kind = meta.get("tapernorm.graph_kind", "generic")
        self.input_names = list(ins)
        required = ("input_ids", "attention_mask") + (() if self.kv_shared else ("position_ids",))
        missing = [n for n in required if n not in ins]
        if "logits" not in outs:
            missing.append("logits (output)")
        n_layers = sum(1 for n in ins if n.startswith("past_key_values.") and n.endswith(".key"))
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
        missing += [n for n in self.past_names if n not in ins] + [n for n in self.present_names if n not in outs]
        if n_layers == 0:
            missing.append("past_key_values.{i}.key|value")
        if missing:
            raise ModelDirError(f"{self.model_path} does not have the tapernorm decoder interface (missing {missing}); "
                                f"export it with `tapernorm compile`")
        self.output_names = outs
        self.n_layers = n_layers
        first = ins[self.past_names[0]]
        self.np_dtype = ORT_DTYPES.get(first.type)
        if self.np_dtype is None:
            raise ModelDirError(f"{self.model_path}: KV cache type {first.type} is not supported (float32/float16)")
        self._past_shape = first.shape  # [B, H, P, D], H and D static
        logits_shape = self.session.get_outputs()[outs.index("logits")].shape
        self._vocab = logits_shape[-1] if isinstance(logits_shape[-1], int) else None

    def _load_config(self) -> RuntimeConfig:
        """runtime.json if present, cross-checked against the graph; else inferred from graph + config.json."""
        H, D = self._past_shape[1], self._past_shape[3]
        inferred = dict(n_layers=self.n_layers, num_kv_heads=H if isinstance(H, int) else None,
                        head_dim=D if isinstance(D, int) else None, vocab_size=self._vocab,
                        dtype=np.dtype(self.np_dtype).name)
        rt_path = self.model_dir / "runtime.json"
        data: dict = {}
        if rt_path.is_file():
            try:
                data = json.loads(rt_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ModelDirError(f"{rt_path} is not valid JSON ({e}); re-run `tapernorm compile`") from None
            if not isinstance(data, dict):
                raise ModelDirError(f"{rt_path} must hold a JSON object; re-run `tapernorm compile`")
            check_runtime_fields(data, rt_path)
            if "n_heads" in data:  # older runtime.json: n_heads meant the cache's heads
                data.setdefault("num_kv_heads", data.pop("n_heads"))
            for k, v in inferred.items():
                if v is not None and k in data and data[k] is not None and data[k] != v:
                    raise _MixedFiles(f"{rt_path}: {k}={data[k]!r} but {self.model_path.name} has {v!r}; "
                                        f"the directory mixes files from different compiles, re-run `tapernorm compile`")
        cfg_path = self.model_dir / "config.json"
        if data.get("max_seq_len") is None and cfg_path.is_file():
            try:
                ctx = json.loads(cfg_path.read_text()).get("tapernorm", {}).get("max_seq_len")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                ctx = None
            check_runtime_fields({"max_seq_len": ctx}, cfg_path)
            data["max_seq_len"] = ctx
        if data.get("max_seq_len") is None:  # never guess: decoding past the context gives garbage silently
            raise ModelDirError(f"cannot tell the context limit of {self.model_path}: neither {rt_path.name} nor "
                                f"config.json in {self.model_dir} gives max_seq_len; re-run `tapernorm compile`, or "
                                f"add \"max_seq_len\" to {rt_path}")
        self._check_context(int(data["max_seq_len"]), rt_path if rt_path.is_file() else cfg_path)
        merged = {**{k: v for k, v in inferred.items() if v is not None}, **{k: v for k, v in data.items()
                                                                             if k in RuntimeConfig.__dataclass_fields__}}
        missing = [k for k in ("n_layers", "num_kv_heads", "head_dim", "vocab_size") if merged.get(k) is None]
        if missing:
            raise ModelDirError(f"cannot tell {missing} for {self.model_path}; add them to {rt_path} "
                                f"(re-run `tapernorm compile`)")
        return RuntimeConfig(**merged)

    def _check_context(self, max_seq_len: int, where: Path) -> None:
        """One line when max_seq_len exceeds what the graph can position: the rows of its rotary cos cache
        (a lean graph's GroupQueryAttention / RotaryEmbedding fails past them), else config.json's context."""
        limit = _rotary_rows(self.model_path)
        what = f"the rotary cache of {self.model_path.name} has {limit} positions"
        if limit is None:
            limit = _config_context(self.model_dir / "config.json")
            what = f"config.json in {self.model_dir} gives a {limit}-token context"
        if limit is not None and max_seq_len > limit:
            raise ModelDirError(f"{where}: max_seq_len {max_seq_len} exceeds the model's context ({what}); decoding "
                                f"past it fails or gives garbage: set max_seq_len to at most {limit}, or re-run "
                                "`tapernorm compile`")

    # -- helpers used by the decode loop ----------------------------------------------------------
    def empty_past_arrays(self, batch: int) -> dict[str, np.ndarray]:
        """{past input name: zero-length host array (B, H_kv, 0, D)}: the first step's past, for `session.run`."""
        z = np.zeros((batch, self.config.num_kv_heads, 0, self.config.head_dim), dtype=self.np_dtype)
        return {n: z for n in self.past_names}

    def empty_past(self, batch: int) -> list[ort.OrtValue]:
        """Zero-length past OrtValues (B, H_kv, 0, D) on the session's device, one per past input (IOBinding)."""
        if self.device == "cuda":
            shape = [batch, self.config.num_kv_heads, 0, self.config.head_dim]
            return [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.np_dtype, "cuda", self.device_id)
                    for _ in self.past_names]
        return [ort.OrtValue.ortvalue_from_numpy(z) for z in self.empty_past_arrays(batch).values()]

    def io_binding(self) -> ort.IOBinding:
        """A fresh IOBinding (bind the outputs with `bind_outputs` before each run)."""
        return self.session.io_binding()

    def bind_outputs(self, io: ort.IOBinding, logits: np.ndarray | None = None) -> None:
        """(Re)bind the outputs: presents allocated by ORT on the session's device (they are fed back as the
        next past, so they must be fresh each run: their shape grows), logits into the host array `logits`
        (B, T, V) when given (written in place, no extra copy), else allocated on the host."""
        io.clear_binding_outputs()
        for name in self.present_names:
            io.bind_output(name, self.device, self.device_id)
        if logits is None:
            io.bind_output("logits", "cpu")
        else:
            io.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)

    def run(self, feeds: dict) -> list:
        """Plain `session.run` (numpy in, numpy out), for parity checks."""
        return self.session.run(None, feeds)

    def end_profiling(self) -> str:
        """Stop ORT's profiler; returns the JSON trace path."""
        return self.session.end_profiling()

    def describe(self) -> dict:
        """Providers, threads and model facts, for logs and benchmark reports."""
        return {"model": str(self.model_path), "providers": self.providers, "device": self.device,
                "requested_provider": self.requested_provider, "intra_op_threads": self.intra_op_threads,
                "inter_op_threads": self.inter_op_threads, "onnxruntime": ort.__version__,
                "graph_kind": self.graph_kind, "kv_shared": self.kv_shared, **self.config.to_dict()}
