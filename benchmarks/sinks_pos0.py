"""Experiment only (docs/real_checkpoints.md, section 3): fine-tune SmolLM2-135M with Internal-Taper where position 0
has its own c0 (mean 1 / RMS of position 0 during warmup), i.e. what a per-position Mul in the folded graph would
buy. Monkeypatches TaperNorm.forward in this process only; the saved model does not carry c0 (not foldable today).

    nice -n 10 .venv/bin/python benchmarks/sinks_pos0.py OUT_DIR mode=internal [calib_per_feature=1 rms_loss=1.0 taper_hold=14]
"""
import sys, json, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from real_checkpoint import smollm2_dir
from tapernorm.layers import TaperNorm
from tapernorm.train.finetune import finetune
from tapernorm.train.finetune_cli import FinetuneConfig
orig = TaperNorm.forward
def fwd(self, x):
    if self.collecting and self.training and x.dim() == 3:
        r0 = x[:, 0].detach().double().pow(2).mean(-1).add(self.eps).sqrt()
        self.__dict__.setdefault("_p0", []).append(float((1 / r0).mean()))
    y = orig(self, x)
    g = self.gate
    if g < 1.0 and x.dim() == 3 and self.__dict__.get("_p0"):
        c0 = sum(self._p0) / len(self._p0)
        x0 = x[:, :1]
        r_inv = torch.rsqrt(x0.float().pow(2).mean(-1, keepdim=True) + self.eps)
        y0 = g * (x0 * r_inv).type_as(x) * self.weight + (1 - g) * x0 * (c0 * self.weight_t)
        y = torch.cat([y0, y[:, 1:]], 1)
    return y
TaperNorm.forward = fwd
extra = dict(a.split("=") for a in sys.argv[2:])
cfg = FinetuneConfig(model=str(smollm2_dir()), out_dir=sys.argv[1], overwrite=True, steps=40, warmup_steps=4,
                     taper_start=8, taper_end=36, seq_len=64, batch_size=2, eval_batches=8, lr=1e-4,
                     max_chars=400_000, calib_stat="inv_rms", calib_skip=1,
                     **{k: (v if k == "mode" else float(v)) for k, v in extra.items()})
try:
    s = finetune(cfg)
    print(json.dumps({k: s[k] for k in ("val_loss_before", "val_loss_after", "final_gate", "seconds")}))
except Exception as e:
    print("DIVERGED", type(e).__name__, str(e)[:300])
