"""Trainer bookkeeping without pickle: optimizer / RNG state <-> (JSON, tensors), the JSONL step log,
and gradient norms grouped by weight type."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..layers import TAPER_TYPES

__all__ = ["pack_optimizer", "unpack_optimizer", "pack_rng", "unpack_rng", "grad_groups", "grad_norms",
           "JsonlLog", "read_log"]


def pack_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """optimizer.state_dict() -> (JSON part, {"optim.{param}.{key}": tensor})."""
    sd = opt.state_dict()
    tensors, state_js = {}, {}
    for pid, st in sd["state"].items():
        entry = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
                entry[k] = "__tensor__"
            else:
                entry[k] = v
        state_js[str(pid)] = entry
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return {"state": state_js, "param_groups": groups}, tensors


def unpack_optimizer(opt: torch.optim.Optimizer, js: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of pack_optimizer: load the state into `opt` (tensors moved to the params' devices by torch)."""
    state = {}
    for pid, entry in js["state"].items():
        state[int(pid)] = {k: (tensors[f"optim.{pid}.{k}"] if v == "__tensor__" else v) for k, v in entry.items()}
    groups = []
    for g in js["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def pack_rng() -> dict[str, torch.Tensor]:
    """Torch CPU (and CUDA, if present) generator states as uint8 tensors."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def unpack_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Restore what pack_rng saved (CUDA states only when the device count matches)."""
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def grad_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters by weight type: norm gains, attention, mlp, embedding (tied head included), other."""
    norm_types = TAPER_TYPES + (nn.RMSNorm, nn.LayerNorm)
    owner = {}
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            owner.setdefault(id(p), (f"{mname}.{pname}" if mname else pname, m))
    groups: dict[str, list[nn.Parameter]] = {"norm": [], "attn": [], "mlp": [], "embed": [], "other": []}
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        name, m = owner[id(p)]
        if isinstance(m, norm_types):
            groups["norm"].append(p)
        elif ".self_attn." in f".{name}":
            groups["attn"].append(p)
        elif ".mlp." in f".{name}":
            groups["mlp"].append(p)
        elif isinstance(m, nn.Embedding) or "embed" in name or "lm_head" in name:
            groups["embed"].append(p)
        else:
            groups["other"].append(p)
    return {k: v for k, v in groups.items() if v}


@torch.no_grad()
def grad_norms(groups: dict[str, list[nn.Parameter]]) -> dict[str, float]:
    """L2 norm of the gradients in each group (parameters without a gradient count as zero)."""
    out = {}
    for k, ps in groups.items():
        sq = sum(float(p.grad.float().pow(2).sum()) for p in ps if p.grad is not None)
        out[k] = math.sqrt(sq)
    return out


class JsonlLog:
    """Append-only JSONL step log (one JSON object per line, flushed each write)."""

    def __init__(self, path: str | os.PathLike, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            keep = [r for r in read_log(self.path) if _keep(r, truncate_after_step)]
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.path)
        self.f = open(self.path, "a")

    def write(self, record: dict) -> None:
        """Append one record (a full disk: DiskFullError naming the log; read_log skips a torn last line)."""
        line = json.dumps(record) + "\n"
        try:
            self.f.write(line)
            self.f.flush()
        except OSError as e:
            from ..fileio import disk_full_error, is_disk_full
            if not is_disk_full(e):
                raise
            raise disk_full_error(self.path, len(line) + (64 << 10), "the records written before are kept") from None

    def close(self) -> None:
        self.f.close()


def _keep(rec: dict, start: int) -> bool:
    """On resume at step `start`: keep train steps < start and evals after <= start steps."""
    return rec.get("step", 0) < start if rec.get("kind", "train") == "train" else rec.get("step", 0) <= start


def read_log(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL log (a torn last line from a crash is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
