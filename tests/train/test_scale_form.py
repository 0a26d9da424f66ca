"""The scale loss's two forms (paper: (s - s_tgt)^2, relative: (s / s_tgt - 1)^2) and the trainer's
full-split final validation loss."""
import json

import pytest
import torch

from _train_helpers import fast_cfg, make_tokenizer
from tapernorm.data import Tokenizer, load_corpus, tokenize_corpus
from tapernorm.train.config import TrainConfig
from tapernorm.train.scale_loss import scale_loss, scale_stat
from tapernorm.train.state import read_log
from tapernorm.train.trainer import evaluate, train


def test_relative_form_is_paper_form_over_target_squared():
    h = torch.randn(2, 5, 8) * 0.3
    for tgt in (0.05, 0.3, 2.0):
        paper = scale_loss(h, tgt, 0.7, form="paper")
        rel = scale_loss(h, tgt, 0.7, form="relative")
        assert rel.item() == pytest.approx(paper.item() / tgt ** 2, rel=1e-5)


@pytest.mark.parametrize("form", ["paper", "relative"])
@pytest.mark.parametrize("scale", [0.2, 5.0])
def test_both_forms_restore_the_scale(form, scale):
    """A gradient step moves s(h) toward the target from above and from below (Proposition 4.3)."""
    h = (torch.randn(3, 4, 16) * scale).requires_grad_()
    s0 = scale_stat(h).mean().item()
    scale_loss(h, 1.0, 0.1, form=form).backward()
    s1 = scale_stat(h.detach() - 0.1 * h.grad).mean().item()
    assert abs(s1 - 1.0) < abs(s0 - 1.0)


def test_bad_form_and_target_fail_with_one_line():
    with pytest.raises(ValueError, match="scale-loss form 'square'"):
        scale_loss(torch.ones(1, 2, 4), 1.0, 0.1, form="square")
    with pytest.raises(ValueError, match="positive target"):
        scale_loss(torch.ones(1, 2, 4), 0.0, 0.1, form="relative")
    with pytest.raises(ValueError, match="scale_form 'square' is not one of"):
        TrainConfig(scale_form="square").normalized()


def test_relative_form_trains_and_final_val_loss_covers_the_full_split(tmp_path):
    tok = make_tokenizer(tmp_path / "tok.model").path
    res = train(fast_cfg(tmp_path / "run", tok, mode="all", scale_form="relative", scale_lambda=0.1, steps=16))
    log = [r for r in read_log(tmp_path / "run" / "log.jsonl")]
    last = [r for r in log if r["kind"] == "train"][-1]
    assert last["scale_loss"] == pytest.approx(0.1 * (last["prelogit_rms"] / last["s_tgt"] - 1) ** 2, rel=0.5)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    data = tokenize_corpus(load_corpus("builtin", max_chars=60_000), Tokenizer.load(tok), 32, 0.1)
    assert summary["val_tokens"] == (len(data.val) - 1) // 32 * 32 > 4 * 8 * 32  # more than eval_batches cover
    from tapernorm.checkpoint import load_checkpoint
    model, _ = load_checkpoint(res.model_dir)
    assert summary["val_loss"] == pytest.approx(evaluate(model, data.val, 8, 32, None), rel=1e-6)
    assert [r for r in log if r["kind"] == "eval"][-1]["full_split"] is True
