"""Fine-tune a Hugging Face causal LM with tapering on HF's own Trainer (so DDP/FSDP/DeepSpeed come from
accelerate / torchrun as users already run them).

    TaperCallback      holds the gate at 1, collects c statistics through warmup, calibrates at the taper start
                       (EMAs averaged over ranks), decays the gate by cosine to exactly 0 (schedule.py), keeps 0
    TaperTrainer       Trainer + the fixed-target scale loss on the final norm's input (scale_loss.py)
    finetune(cfg)      corpus -> tokens -> taperize -> evaluate -> Trainer -> evaluate -> OUT/model, summary.json

With your own Trainer script: taperize the model, then

    target = ScaleTarget()
    trainer = TaperTrainer(model=model, args=TrainingArguments(..., ddp_broadcast_buffers=False,
                           ddp_find_unused_parameters=True), train_dataset=ds, scale_target=target,
                           callbacks=[TaperCallback(resolve_schedule(T, warmup=W, taper_start=t0, taper_end=t1), target)])

(buffers must not be broadcast, or every rank calibrates on rank 0's statistics; the branch a gate skips leaves
parameters unused, hence find_unused_parameters). Evaluation is FakeLN's: token-weighted mean cross-entropy over fixed-length chunks of held-out text.
Output: OUT/model (tapernorm.save_pretrained: reload with tapernorm.from_pretrained, compile with
`tapernorm compile`), OUT/summary.json, OUT/log_history.json (the Trainer's logs).
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..data import load_corpus, tokenize_corpus, val_batches
from ..fileio import atomic_write_text, canonical_out, dir_lock
from ..hf import from_pretrained, save_pretrained
from ..bound import set_bound, set_bound_rms
from ..cap import cap_rate, set_cap
from ..layers import TaperLayerNorm, begin_calibration, find_final_norm, set_gate, taper_layers, taperize
from ..replace_norms import mlp_norm_pattern
from .auto_recipe import choose_recipe, late_taper_hint
from .finetune_cli import LR_SCHEDULES, FinetuneConfig
from .finetune_out import json_text, prepare_out, recover_out, save_plain
from .rundir import LATE_TAPER_GATE, TrainingDiverged, divergence_message
from .ranks import init_distributed as _init_distributed, rank as _rank, world as _world
from .rms_loss import NormRmsLoss, add_rms_loss
from .scale_loss import ScaleTarget, scale_loss, scale_stat
from .staged import StagedGates
from .schedule import TaperSchedule, resolve_schedule
from .trainer import _finish_calibration

__all__ = ["TaperCallback", "TaperTrainer", "finetune", "evaluate_chunks", "load_text_tokenizer"]


def _callback_base():
    from transformers import TrainerCallback
    return TrainerCallback


class TaperCallback(_callback_base()):
    """The taper schedule on HF's Trainer: gate 1 and calibration before t0, cosine to exactly 0 at t1, then 0.

    `on_step_begin` sees state.global_step = t, the optimizer step about to run, and sets gate(t) for its
    forward passes; at t == t0 it first freezes c (EMAs averaged over ranks) and the scale target.
    """

    def __init__(self, schedule: TaperSchedule, target: ScaleTarget | None = None, calib_opts: dict | None = None,
                 staged=None):
        self.schedule, self.target = schedule, target
        self.calibration: dict[str, float] = {}
        self.calib_opts, self.staged = dict(calib_opts or {}), staged  # layers.begin_calibration's; StagedGates

    def _set_gates(self, model, t: int) -> float:
        if self.staged is not None:
            return self.staged.apply(model, t)
        set_gate(model, self.schedule.gate(t))
        return self.schedule.gate(t)

    def _calibrate(self, model) -> None:
        if any(not m.calibrated for _, m in taper_layers(model)):
            self.calibration = _finish_calibration(model, _world())
        if self.target is not None and self.target.frozen is None and self.target.n:
            self.target.freeze()

    def on_train_begin(self, args, state, control, model=None, **kw):
        if state.global_step <= self.schedule.taper_start and not any(m.calibrated for _, m in taper_layers(model)):
            set_gate(model, 1.0)
            begin_calibration(model, **self.calib_opts)

    def on_step_begin(self, args, state, control, model=None, **kw):
        t = state.global_step
        if t >= self.schedule.taper_start:
            self._calibrate(model)
        self._set_gates(model, t)

    def on_log(self, args, state, control, logs=None, model=None, **kw):
        if state.is_world_process_zero and logs and "loss" in logs:
            rate = cap_rate(model) if model is not None else None
            capped = f" capped {rate:.2e}" if rate is not None else ""
            print(f"[finetune] step {state.global_step}/{state.max_steps} loss {float(logs['loss']):.4f} "
                  f"gate {self._last_gate(model, state.global_step):.4f} lr {float(logs.get('learning_rate', 0)):.3g}"
                  f"{capped}", file=sys.stderr, flush=True)

    def _last_gate(self, model, step: int) -> float:
        """The gate of the last step taken (the mean over layers under a staged schedule)."""
        if self.staged is not None and model is not None:
            g = self.staged.gates(model, max(0, step - 1))
            return sum(g.values()) / max(1, len(g))
        return self.schedule.gate(max(0, step - 1))

    def on_train_end(self, args, state, control, model=None, **kw):
        self._calibrate(model)
        self._set_gates(model, state.global_step)


def _trainer_base():
    from transformers import Trainer
    return Trainer


class TaperTrainer(_trainer_base()):
    """HF Trainer plus L_aux = lambda * E[(s(h) - s_tgt)^2] on the pre-logit residual h (the final norm's input).

    s_tgt is the EMA of the batch-mean s (averaged over ranks) while it is not frozen; TaperCallback freezes it
    at the taper start. With gradient accumulation the term is divided by the accumulation steps, like the CE."""

    def __init__(self, *args, scale_target: ScaleTarget | None = None, scale_lambda: float = 1.0,
                 scale_form: str = "relative", rms_loss=None, **kw):
        super().__init__(*args, **kw)
        self.scale_target, self.scale_lambda, self.scale_form = scale_target, float(scale_lambda), scale_form
        self.rms_loss = rms_loss  # rms_loss.NormRmsLoss or None
        final = find_final_norm(self.model)
        if final is None:
            raise ValueError(f"{type(self.model).__name__} has no final norm; the scale loss needs the pre-logit input")
        norm = self.model.get_submodule(final)
        self._centered = isinstance(norm, (nn.LayerNorm, TaperLayerNorm))
        self._h: list[torch.Tensor] = []
        norm.register_forward_pre_hook(lambda m, inp: self._h.append(inp[0]) if m.training else None)
        self.aux_log: list[float] = []

    def training_step(self, model, inputs, *args, **kw):
        """HF's step (forward + backward), then stop before the optimizer step if the loss or any gradient is
        not finite, in every mode (HF would otherwise apply it, and log a NaN loss as an average)."""
        loss = super().training_step(model, inputs, *args, **kw)
        loss_v = float(loss.detach())
        grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
        gnorm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
                      ) if grads else 0.0
        bad = not (math.isfinite(loss_v) and math.isfinite(gnorm))
        if _world() > 1:  # every rank takes the same decision
            flag = torch.tensor([float(bad)], device=loss.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bool(flag.item())
        if bad:
            raise TrainingDiverged(self._diverged(loss_v, gnorm))
        return loss

    def _diverged(self, loss: float, gnorm: float) -> str:
        layers = taper_layers(self.model)
        cb = next((c for c in self.callback_handler.callbacks if isinstance(c, TaperCallback)), None)
        taper = (cb.schedule.taper_start, cb.schedule.taper_end) if cb else None
        try:
            lr = float(self.lr_scheduler.get_last_lr()[0])
        except (AttributeError, IndexError, TypeError):
            lr = self.args.learning_rate
        out = getattr(self, "out_dir", None)
        kept = (f"{out / 'model'} {'is unchanged' if (out / 'model').exists() else 'was not created'}"
                if out is not None else "nothing was saved")
        return divergence_message(self.state.global_step, loss, gnorm, lr, layers[0][1].gate if layers else None,
                                  taper, bool(self.args.bf16), Path("."), kept=kept,
                                  late_taper_hint=late_taper_hint(getattr(self, "recipe", "")))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._h.clear()
        if self.rms_loss is not None:
            self.rms_loss.clear()
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if model.training and self.rms_loss is not None:
            out = add_rms_loss(out, self.rms_loss, return_outputs, self.args.gradient_accumulation_steps)
        if not model.training or self.scale_target is None or not self._h:
            return out
        loss, rest = (out[0], out[1:]) if return_outputs else (out, ())
        h = self._h[-1]  # (B, T, d)
        mask = inputs.get("attention_mask")
        tgt = self.scale_target
        if tgt.frozen is None:
            s = scale_stat(h.detach(), self._centered).mean().double()
            if _world() > 1:
                dist.all_reduce(s)
                s /= _world()
            tgt.update(float(s))
        elif self.scale_lambda > 0:
            aux = scale_loss(h, tgt.frozen, self.scale_lambda, self._centered, mask, self.scale_form)
            aux = aux / self.args.gradient_accumulation_steps
            self.aux_log.append(float(aux.detach()))
            loss = loss + aux
        return (loss, *rest) if return_outputs else loss


class _HFTextTokenizer:
    """An HF tokenizer with the encode_batch / eos_id / bos_id / vocab_size shape tokenize_corpus uses."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.eos_token_id
        self.bos_id = tok.bos_token_id
        self.vocab_size = len(tok)
        if self.eos_id is None:
            raise ValueError("the model's tokenizer has no EOS token; the corpus stream needs one between documents")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]


def load_text_tokenizer(model_dir: str):
    """The tokenizer of an HF model: its tokenizer.model through SentencePiece (exactly what our runtime uses),
    else transformers' AutoTokenizer."""
    p = Path(model_dir)
    if (p / "tokenizer.model").is_file():
        from ..data import Tokenizer
        return Tokenizer.load(p / "tokenizer.model")
    from transformers import AutoTokenizer
    try:
        return _HFTextTokenizer(AutoTokenizer.from_pretrained(model_dir))
    except (OSError, ValueError) as e:
        raise ValueError(f"{model_dir}: no tokenizer could be loaded ({str(e).splitlines()[0]}); the model "
                         "directory needs tokenizer files (tokenizer.model or tokenizer.json)") from None


@torch.no_grad()
def evaluate_chunks(model, stream: torch.Tensor, seq_len: int, batch_size: int, max_batches: int) -> float:
    """Token-weighted mean cross-entropy over non-overlapping held-out chunks of seq_len tokens (FakeLN's eval)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    tot, n = 0.0, 0
    for x, y in val_batches(stream, batch_size, seq_len, max_batches):  # each (B, T)
        logits = model(input_ids=x.to(dev), use_cache=False).logits  # (B, T, V)
        tot += float(F.cross_entropy(logits.float().flatten(0, 1), y.to(dev).flatten(), reduction="sum"))
        n += y.numel()
    model.train(was)
    return tot / max(n, 1)


class _Chunks(torch.utils.data.Dataset):
    """Non-overlapping training chunks of seq_len tokens; labels = inputs (the model shifts them)."""

    def __init__(self, stream: torch.Tensor, seq_len: int):
        self.stream, self.L = stream, int(seq_len)

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.L

    def __getitem__(self, i: int) -> dict:
        x = self.stream[i * self.L:(i + 1) * self.L]
        return {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)}


def finetune(cfg: FinetuneConfig) -> dict:
    """Run one fine-tuning (one process, or one rank under torchrun); returns the summary dict.

    Rank 0 holds the lock on OUT for the whole run (a second finetune into OUT fails at once, naming the
    holder's PID) and first repairs what a killed run left there."""
    cfg = cfg.with_recipe().check()
    if _rank() != 0:
        return _finetune(cfg)
    out = canonical_out(cfg.out_dir)
    existed = out.exists()
    with dir_lock(out, f"tapernorm finetune --out {out}"):
        recover_out(out)
        try:
            return _finetune(cfg)
        except BaseException:
            if not existed and out.is_dir() and not os.listdir(out):
                out.rmdir()  # a refused or failed run leaves no empty OUT behind
            raise


def _keep_pattern(cfg: FinetuneConfig, model) -> str | None:
    """taperize's keep regex: --keep-norms, or'ed with the family's MLP-input norms under --keep-mlp-norms."""
    parts = [cfg.keep_norms] if cfg.keep_norms else []
    if cfg.keep_mlp_norms and cfg.mode != "baseline":
        parts.append(mlp_norm_pattern(model))
    return "|".join(f"(?:{p})" for p in parts) or None


def _bound_norms(model, cfg: FinetuneConfig) -> None:
    """--taper-bound / --taper-bound-rms: the MLP-input (scope "mlp") or all tapered norms taper to the bounded map
    (tapernorm/bound.py), with one B or a B per feature measured at calibration; RMSNorm only."""
    pattern = mlp_norm_pattern(model) if cfg.taper_bound_scope == "mlp" else "."
    bounded = set(set_bound(model, cfg.taper_bound, pattern) if cfg.taper_bound
                  else set_bound_rms(model, cfg.taper_bound_rms, pattern))
    flag = "--taper-bound" if cfg.taper_bound else "--taper-bound-rms"
    ln = [n for n, m in taper_layers(model) if n in bounded and isinstance(m, TaperLayerNorm)]
    if ln:
        raise ValueError(f"{flag}: {ln[0]} is a LayerNorm; bounded maps fold only for RMSNorm models so far "
                         "(taper this family without a bound)")


def _finetune(cfg: FinetuneConfig) -> dict:
    t_start = time.time()
    out = Path(cfg.out_dir)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {world} processes; use a multiple")
    if _rank() == 0:
        prepare_out(out, cfg.overwrite)  # before the slow part: nothing of the user's is ever replaced
    docs = load_corpus(cfg.corpus, cfg.max_docs, cfg.max_chars)
    model = from_pretrained(cfg.model)  # first: a bad config.json or weights file is named as such
    tok = load_text_tokenizer(cfg.model) if Path(cfg.model).is_dir() else None
    if tok is None:  # a hub name: its tokenizer comes from the same place
        from transformers import AutoTokenizer
        tok = _HFTextTokenizer(AutoTokenizer.from_pretrained(cfg.model))
    if taper_layers(model):
        raise ValueError(f"{cfg.model} is already tapered; fine-tune a model that has its norms")
    data = tokenize_corpus(docs, tok, cfg.seq_len, cfg.val_frac)
    if len(_Chunks(data.train, cfg.seq_len)) < cfg.batch_size:
        raise ValueError(f"corpus too small: fewer than {cfg.batch_size} training chunks of {cfg.seq_len} tokens")
    torch.manual_seed(cfg.seed)
    if torch.cuda.is_available():  # the Trainer would move it there anyway; evaluate there too
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    _init_distributed(world)
    cfg, auto = choose_recipe(cfg, model, data.train, verbose=_rank() == 0)  # before any taper: the plain model
    T, W, t0, t1 = cfg.resolved_steps()
    sched = resolve_schedule(T, warmup=W, taper_start=t0, taper_end=t1)
    val_before = evaluate_chunks(model, data.val, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
    tapering = cfg.mode != "baseline"
    names = taperize(model, cfg.mode, keep=_keep_pattern(cfg, model)) if tapering else []
    for _, m in taper_layers(model):
        m.beta_ema = cfg.beta_ema
    if tapering and cfg.taper_cap:
        set_cap(model, cfg.taper_cap, cfg.cap_anneal)
    if names and (cfg.taper_bound or cfg.taper_bound_rms):
        _bound_norms(model, cfg)
    target = ScaleTarget(cfg.beta_ema) if cfg.scale_loss and tapering else None
    scratch = tempfile.mkdtemp(prefix="tapernorm-finetune-")  # the Trainer's output_dir (save_strategy "no"):
    try:  # never inside OUT, where a directory of the user's could have its name
        return _train_and_save(cfg, model, data, names, target, sched, out, world, val_before, scratch, t_start, auto)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train_and_save(cfg, model, data, names, target, sched, out: Path, world: int, val_before: float,
                    scratch: str, t_start: float, auto=None) -> dict:
    """The Trainer run, the evaluation after it, and (rank 0) OUT/model, summary.json, log_history.json."""
    from transformers import TrainingArguments
    T, W, t0, t1 = cfg.resolved_steps()
    tapering = cfg.mode != "baseline"
    use_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=scratch, max_steps=T, logging_nan_inf_filter=False, per_device_train_batch_size=cfg.batch_size // world,
        learning_rate=cfg.lr, lr_scheduler_type=LR_SCHEDULES[cfg.lr_schedule], warmup_steps=W,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip, seed=cfg.seed, data_seed=cfg.seed, logging_steps=max(1, T // 20),
        save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True, use_cpu=use_cpu,
        bf16=cfg.bf16, ddp_broadcast_buffers=False, ddp_find_unused_parameters=True,
        dataloader_num_workers=0, remove_unused_columns=False, ddp_backend="gloo" if use_cpu and world > 1 else None)
    calib = {"skip_positions": cfg.calib_skip, "stat": cfg.calib_stat, "per_feature": cfg.calib_per_feature,
             "pos0": cfg.calib_pos0}
    staged = (StagedGates(sched, cfg.taper_order, hold=cfg.taper_hold)
              if tapering and (cfg.taper_order != "global" or cfg.taper_hold) else None)
    rms = (NormRmsLoss(model, cfg.rms_loss, skip_positions=1 if cfg.calib_pos0 else 0,  # c0 serves position 0
                       hinge=cfg.rms_hinge)
           if tapering and cfg.rms_loss > 0 else None)
    trainer = TaperTrainer(model=model, args=args, train_dataset=_Chunks(data.train, cfg.seq_len),
                           callbacks=[TaperCallback(sched, target, calib, staged)] if tapering else [],
                           scale_target=target, scale_lambda=cfg.scale_lambda, scale_form=cfg.scale_form,
                           rms_loss=rms)
    from transformers.trainer_callback import PrinterCallback
    trainer.remove_callback(PrinterCallback)  # the logs go to OUT/log_history.json, not stdout
    trainer.out_dir, trainer.recipe = out, cfg.recipe  # named by the divergence line
    trainer.train()
    model = trainer.model
    final_gate = sched.gate(T) if tapering else None
    val_after = evaluate_chunks(model, data.val, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
    if not math.isfinite(val_after):  # finite steps, yet the result overflows: nothing of it is kept
        late = final_gate is not None and final_gate < LATE_TAPER_GATE
        fix = f"at gate {final_gate:g} {late_taper_hint(cfg.recipe)}" if late else "lower --lr or raise --warmup-steps"
        raise TrainingDiverged(f"training diverged: the held-out loss after fine-tuning is {val_after} (before: "
                               f"{val_before:.4g}); {fix}; nothing was written "
                               f"({out / 'model'} {'is unchanged' if (out / 'model').exists() else 'was not created'})")
    cb = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TaperCallback)), None)
    summary = {"model": cfg.model, "model_dir": str(out / "model"), "mode": cfg.mode, "tapered_layers": names,
               "val_loss_before": val_before, "val_loss_after": val_after, "final_gate": final_gate,
               "steps": T, "schedule": {"name": cfg.schedule, "total": T, "warmup": W, "taper_start": t0,
                                        "taper_end": t1},
               "calibration": cb.calibration if cb else {}, "scale_target": target.frozen if target else None,
               "eval_tokens": sum(y.numel() for _, y in val_batches(data.val, cfg.batch_size, cfg.seq_len,
                                                                      cfg.eval_batches)),
               "world_size": world, "seconds": round(time.time() - t_start, 2), "config": cfg.to_dict(),
               "recipe_auto": auto.to_dict() if auto else None}
    if _rank() == 0:
        src = cfg.model if Path(cfg.model).is_dir() else None
        if tapering:
            save_pretrained(model.cpu(), out / "model", tokenizer_from=src, extra={"finetune": summary["schedule"]})
        else:
            save_plain(model.cpu(), out / "model", src)
        atomic_write_text(out / "summary.json", json_text(summary))
        atomic_write_text(out / "log_history.json", json_text(trainer.state.log_history))
    if _world() > 1:
        dist.barrier()
    return summary
