"""Helpers for the lean-graph tests: tiny models with GQA-sized heads, lean files beside a runtime.json."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tapernorm import build_model, calibrate, set_gate
from tapernorm.compiler.export_onnx import KVCacheLM, dynamic_shapes, example_inputs, write_runtime_json
from tapernorm.compiler.lean import build_lean
from tapernorm.passes import fold, materialize
from tapernorm.passes.capture import capture
from tiny_models import random_batches


def lean_model(arch: str = "tiny", mode: str = "internal", n_heads: int = 2, gate: float = 0.0, seed: int = 0):
    """A calibrated tiny model at `gate` with non-trivial norm gains; n_heads=2 gives head_dim 16 (rotary in GQA)."""
    torch.manual_seed(seed)
    model = build_model(arch, taper_mode=mode, n_heads=n_heads)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "norm.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("layernorm.bias", "norm.bias")):
                p.uniform_(-0.2, 0.2)
        model.embed_tokens.weight.mul_(20)  # logits of a useful size: greedy tokens vary
    if mode != "baseline":
        calibrate(model, random_batches())
        set_gate(model, gate)
    return model.eval()


def build_lean_dir(model, out: Path, variants=("folded", "unfused"), dtype=torch.float32) -> dict:
    """Run the passes and write lean model.onnx / model_unfused.onnx + runtime.json into `out`; returns facts."""
    out.mkdir(parents=True, exist_ok=True)
    name = {torch.float32: "float32", torch.float16: "float16"}[dtype]
    model = model.to(dtype)
    wrapper = KVCacheLM(model)
    args, ds = example_inputs(model.config, dtype=name), dynamic_shapes(model.config.n_layers)
    gm = capture(wrapper, args, dynamic_shapes=ds)
    facts = {}
    for v in variants:
        fn = fold if v == "folded" else materialize
        g2, rep = fn(gm, args, dynamic_shapes=ds, original=wrapper)
        facts[v] = build_lean(model, g2, rep, out / ("model.onnx" if v == "folded" else "model_unfused.onnx"), dtype)
    write_runtime_json(out, model.config, name)
    return facts


def prompt_ids(vocab: int, n: int = 10, k: int = 7) -> list[int]:
    """A fixed prompt of ids."""
    return [(k * i + 3) % vocab for i in range(n)]


@torch.no_grad()
def torch_steps(model, prompt: list[int], n_new: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and each step's last-position logits from full (no-cache) forwards: the plain reference."""
    toks, logits = list(prompt), []
    for _ in range(n_new):
        last = model(torch.tensor([toks]))[0, -1].float().numpy()
        logits.append(last)
        toks.append(int(last.argmax()))
    return toks[len(prompt):], logits
