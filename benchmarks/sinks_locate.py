"""Experiment (docs/real_checkpoints.md, section 4): where the SmolLM2 fine-tune overflows. Forward hooks on every
decoder layer print the first outputs with |x| > 1e5 or non-finite (layer, batch row, position, token). POS0=1 adds
sinks_pos0.py's position-0 c0.

    nice -n 10 .venv/bin/python benchmarks/sinks_locate.py OUT mode=internal [calib_stat=inv_rms calib_skip=1]
"""
import sys, os, torch
POS0 = os.environ.get("POS0") == "1"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
if POS0:
    __file__ = os.path.join(HERE, "sinks_pos0.py")
    exec(open(__file__).read().split("extra = dict")[0])
from real_checkpoint import smollm2_dir
import tapernorm.train.finetune as ft
from tapernorm.train.finetune_cli import FinetuneConfig
orig_taperize = ft.taperize
state = {"n": 0, "ids": None, "reported": 0}
def taperize(model, mode):
    names = orig_taperize(model, mode)
    layers = model.model.layers
    def pre(mod, args, kwargs):
        state["n"] += 1
    model.model.register_forward_pre_hook(lambda m, a, k: state.__setitem__("ids", k.get("input_ids")), with_kwargs=True)
    for i, blk in enumerate(layers):
        def hook(mod, inp, out, i=i):
            h = out[0] if isinstance(out, tuple) else out
            if not mod.training or state["reported"] >= 6:
                return
            a = h.detach().abs()
            bad = ~torch.isfinite(h.detach())
            if bad.any() or a.max() > 1e5:
                flat = a.nan_to_num(float("inf")).amax(-1)  # (B, T)
                b, t = divmod(int(flat.argmax()), flat.shape[1])
                g = next(m.gate for n, m in ft.taper_layers(model))
                ids = state["ids"]
                tok = int(ids[b, t]) if ids is not None else -1
                prev = int(ids[b, t - 1]) if ids is not None and t > 0 else -1
                print(f"[locate] layer {i} max {float(a.max()):.3g} nonfinite {int(bad.any())} at b{b} pos {t} token {tok} prev {prev} gate {g:.3f} "
                      f"top positions {flat[b].topk(3).indices.tolist()} {[f'{v:.3g}' for v in flat[b].topk(3).values.tolist()]}",
                      file=sys.stderr, flush=True)
                state["reported"] += 1
        blk.register_forward_hook(hook)
    return names
ft.taperize = taperize
extra = dict(a.split("=") for a in sys.argv[2:])
cfg = FinetuneConfig(model=str(smollm2_dir()), out_dir=sys.argv[1], overwrite=True, steps=40, warmup_steps=4,
                     taper_start=8, taper_end=36, seq_len=64, batch_size=2, eval_batches=8, lr=1e-4,
                     max_chars=400_000, **{k: (v if k in ("mode", "calib_stat") else float(v)) for k, v in extra.items()})
try:
    ft.finetune(cfg)
except Exception as e:
    print("DIVERGED", str(e)[:200])
