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

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..data import load_corpus, tokenize_corpus, val_batches
from ..hf import from_pretrained, save_pretrained
from ..layers import TaperLayerNorm, begin_calibration, find_final_norm, set_gate, taper_layers, taperize
from .finetune_cli import FinetuneConfig
from .scale_loss import ScaleTarget, scale_loss, scale_stat
from .schedule import TaperSchedule, resolve_schedule
from .trainer import _finish_calibration

__all__ = ["TaperCallback", "TaperTrainer", "finetune", "evaluate_chunks", "load_text_tokenizer"]


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def _callback_base():
    from transformers import TrainerCallback
    return TrainerCallback


class TaperCallback(_callback_base()):
    """The taper schedule on HF's Trainer: gate 1 and calibration before t0, cosine to exactly 0 at t1, then 0.

    `on_step_begin` sees state.global_step = t, the optimizer step about to run, and sets gate(t) for its
    forward passes; at t == t0 it first freezes c (EMAs averaged over ranks) and the scale target.
    """

    def __init__(self, schedule: TaperSchedule, target: ScaleTarget | None = None):
        self.schedule, self.target = schedule, target
        self.calibration: dict[str, float] = {}

    def _calibrate(self, model) -> None:
        if any(not m.calibrated for _, m in taper_layers(model)):
            self.calibration = _finish_calibration(model, _world())
        if self.target is not None and self.target.frozen is None and self.target.n:
            self.target.freeze()

    def on_train_begin(self, args, state, control, model=None, **kw):
        if state.global_step <= self.schedule.taper_start and not any(m.calibrated for _, m in taper_layers(model)):
            set_gate(model, 1.0)
            begin_calibration(model)

    def on_step_begin(self, args, state, control, model=None, **kw):
        t = state.global_step
        if t >= self.schedule.taper_start:
            self._calibrate(model)
        set_gate(model, self.schedule.gate(t))

    def on_log(self, args, state, control, logs=None, model=None, **kw):
        if state.is_world_process_zero and logs and "loss" in logs:
            print(f"[finetune] step {state.global_step}/{state.max_steps} loss {float(logs['loss']):.4f} "
                  f"gate {self.schedule.gate(max(0, state.global_step - 1)):.4f} lr {float(logs.get('learning_rate', 0)):.3g}",
                  file=sys.stderr, flush=True)

    def on_train_end(self, args, state, control, model=None, **kw):
        self._calibrate(model)
        set_gate(model, self.schedule.gate(state.global_step))


def _trainer_base():
    from transformers import Trainer
    return Trainer


class TaperTrainer(_trainer_base()):
    """HF Trainer plus L_aux = lambda * E[(s(h) - s_tgt)^2] on the pre-logit residual h (the final norm's input).

    s_tgt is the EMA of the batch-mean s (averaged over ranks) while it is not frozen; TaperCallback freezes it
    at the taper start. With gradient accumulation the term is divided by the accumulation steps, like the CE."""

    def __init__(self, *args, scale_target: ScaleTarget | None = None, scale_lambda: float = 1.0,
                 scale_form: str = "relative", **kw):
        super().__init__(*args, **kw)
        self.scale_target, self.scale_lambda, self.scale_form = scale_target, float(scale_lambda), scale_form
        final = find_final_norm(self.model)
        if final is None:
            raise ValueError(f"{type(self.model).__name__} has no final norm; the scale loss needs the pre-logit input")
        norm = self.model.get_submodule(final)
        self._centered = isinstance(norm, (nn.LayerNorm, TaperLayerNorm))
        self._h: list[torch.Tensor] = []
        norm.register_forward_pre_hook(lambda m, inp: self._h.append(inp[0]) if m.training else None)
        self.aux_log: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._h.clear()
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
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


def _save_plain(model, out: Path, tokenizer_from: str | None) -> None:
    """A baseline run's model: transformers' own save_pretrained (+ the source's tokenizer files), atomically."""
    from ..fileio import staged_dir
    from ..hf import TOKENIZER_FILES
    with staged_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        for name in TOKENIZER_FILES if tokenizer_from else ():
            if (Path(tokenizer_from) / name).is_file():
                shutil.copyfile(Path(tokenizer_from) / name, tmp / name)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {out} is not empty; pass --overwrite or a new --out")


def finetune(cfg: FinetuneConfig) -> dict:
    """Run one fine-tuning (one process, or one rank under torchrun); returns the summary dict."""
    from transformers import TrainingArguments
    t_start = time.time()
    cfg.check()
    T, W, t0, t1 = cfg.resolved_steps()
    sched = resolve_schedule(T, warmup=W, taper_start=t0, taper_end=t1)
    out = Path(cfg.out_dir)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {world} processes; use a multiple")
    docs = load_corpus(cfg.corpus, cfg.max_docs, cfg.max_chars)
    tok = load_text_tokenizer(cfg.model) if Path(cfg.model).is_dir() else None
    model = from_pretrained(cfg.model)
    if tok is None:  # a hub name: its tokenizer comes from the same place
        from transformers import AutoTokenizer
        tok = _HFTextTokenizer(AutoTokenizer.from_pretrained(cfg.model))
    if taper_layers(model):
        raise ValueError(f"{cfg.model} is already tapered; fine-tune a model that has its norms")
    data = tokenize_corpus(docs, tok, cfg.seq_len, cfg.val_frac)
    if len(_Chunks(data.train, cfg.seq_len)) < cfg.batch_size:
        raise ValueError(f"corpus too small: fewer than {cfg.batch_size} training chunks of {cfg.seq_len} tokens")
    _prepare_out(out, cfg.overwrite)
    torch.manual_seed(cfg.seed)
    if torch.cuda.is_available():  # the Trainer would move it there anyway; evaluate there too
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    val_before = evaluate_chunks(model, data.val, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
    tapering = cfg.mode != "baseline"
    names = taperize(model, cfg.mode) if tapering else []
    for _, m in taper_layers(model):
        m.beta_ema = cfg.beta_ema
    target = ScaleTarget(cfg.beta_ema) if cfg.scale_loss and tapering else None
    use_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=T, per_device_train_batch_size=cfg.batch_size // world,
        learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=W, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip, seed=cfg.seed, data_seed=cfg.seed, logging_steps=max(1, T // 20),
        save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True, use_cpu=use_cpu,
        bf16=cfg.bf16, ddp_broadcast_buffers=False, ddp_find_unused_parameters=True,
        dataloader_num_workers=0, remove_unused_columns=False, ddp_backend="gloo" if use_cpu and world > 1 else None)
    trainer = TaperTrainer(model=model, args=args, train_dataset=_Chunks(data.train, cfg.seq_len),
                           callbacks=[TaperCallback(sched, target)] if tapering else [], scale_target=target,
                           scale_lambda=cfg.scale_lambda, scale_form=cfg.scale_form)
    from transformers.trainer_callback import PrinterCallback
    trainer.remove_callback(PrinterCallback)  # the logs go to OUT/log_history.json, not stdout
    trainer.train()
    model = trainer.model
    final_gate = sched.gate(T) if tapering else None
    val_after = evaluate_chunks(model, data.val, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
    cb = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TaperCallback)), None)
    summary = {"model": cfg.model, "model_dir": str(out / "model"), "mode": cfg.mode, "tapered_layers": names,
               "val_loss_before": val_before, "val_loss_after": val_after, "final_gate": final_gate,
               "steps": T, "schedule": {"name": cfg.schedule, "total": T, "warmup": W, "taper_start": t0,
                                        "taper_end": t1},
               "calibration": cb.calibration if cb else {}, "scale_target": target.frozen if target else None,
               "eval_tokens": sum(y.numel() for _, y in val_batches(data.val, cfg.batch_size, cfg.seq_len,
                                                                      cfg.eval_batches)),
               "world_size": world, "seconds": round(time.time() - t_start, 2), "config": cfg.to_dict()}
    if _rank() == 0:
        src = cfg.model if Path(cfg.model).is_dir() else None
        if tapering:
            save_pretrained(model.cpu(), out / "model", tokenizer_from=src, extra={"finetune": summary["schedule"]})
        else:
            _save_plain(model.cpu(), out / "model", src)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2) + "\n")
        shutil.rmtree(out / "trainer", ignore_errors=True)
    if _world() > 1:
        dist.barrier()
    return summary
