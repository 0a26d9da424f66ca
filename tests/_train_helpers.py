"""Shared helpers for the trainer tests: a small corpus slice and fast TrainConfig settings."""
from tapernorm.data import load_corpus, train_tokenizer

CORPUS_CHARS = 60_000
VOCAB = 128


def small_docs():
    """The first ~60k characters of the builtin corpus."""
    return load_corpus("builtin", max_chars=CORPUS_CHARS)


def make_tokenizer(path):
    """Train the shared tiny-vocabulary SentencePiece model once and write it to `path`."""
    return train_tokenizer(small_docs(), VOCAB, out_path=path)


def fast_cfg(out_dir, tokenizer, **kw):
    """A TrainConfig for a few-second tiny run on the corpus slice."""
    from tapernorm.train.trainer import TrainConfig
    base = dict(out_dir=str(out_dir), preset="tiny", tokenizer=str(tokenizer), max_chars=CORPUS_CHARS,
                steps=24, batch_size=8, seq_len=32, lr=3e-3, eval_every=0, eval_batches=4, ckpt_every=0,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)
