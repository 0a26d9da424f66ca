"""What config.json / tokenizer_config.json must say so that `transformers` treats our directories right
(torch-free: plain dicts, shared by checkpoint.py and hf.py). The contract is in docs/CONTRACTS.md.

- Run dirs get the HF fields of their architecture (hidden_size, ...), so a baseline Llama-style run dir loads
  in plain `LlamaForCausalLM` with exactly our logits. A run dir that plain transformers would load *wrong*
  (it tapers, or it is our GPT-2-style model, whose keys are not HF GPT-2's) carries a load guard instead:
  its activation field (`hidden_act` / `activation_function`) is the GUARD string, so building the model
  (`LlamaForCausalLM.from_pretrained`, ...) raises a KeyError that says to use `tapernorm.from_pretrained`,
  while configs and `AutoTokenizer` still load. (`AutoModel*` already refuse the model_type tapernorm_*.)
- Tapered HF directories (hf.py) need no guard in config.json: their weights are named tapernorm.safetensors,
  so transformers' loaders find no weights and raise.
- tokenizer_config.json makes `AutoTokenizer` rebuild our SentencePiece model faithfully (transformers 5's
  TokenizersBackend follows the model's own normalizer) and add BOS, as our runtime does.
"""
from __future__ import annotations

__all__ = ["GUARD", "HF_SECTION", "ACT_FIELDS", "is_guarded", "guard_hf_config", "unguard_dict", "real_attr", "run_dir_hf_fields", "tokenizer_config",
           "needs_guard", "sp_tokenizer_info", "TOKENIZER_CONFIG"]

TOKENIZER_CONFIG = "tokenizer_config.json"

GUARD = "tapernorm: TaperNorm checkpoint, load it with tapernorm.from_pretrained(DIR)"
HF_SECTION = "tapernorm_hf"  # config.json section of a tapered HF directory (run dirs use "tapernorm")


ACT_FIELDS = {"llama": "hidden_act", "gpt2": "activation_function"}  # the field each arch's guard replaces
GUARD_FIELDS = ("hidden_act", "activation_function", "hidden_activation")  # transformers' activation fields
GUARDED_KEY = "tapernorm_guarded"  # {field: real value} of a guarded live config


def is_guarded(config: dict) -> bool:
    """True if config.json carries the load guard."""
    return GUARD in tuple(config.get(f) for f in GUARD_FIELDS)


def guard_hf_config(cfg) -> None:
    """Mark the live transformers config of a tapered model: its activation field(s) become GUARD, the real values
    kept under `tapernorm_guarded`. The running model is unaffected (activations are built at construction), but a
    config.json written by transformers' own save_pretrained then makes every plain loader raise instead of
    loading TaperNorm weights into plain norms. No-op for anything but a transformers config."""
    if cfg is None or not type(cfg).__module__.startswith("transformers"):
        return
    saved = dict(getattr(cfg, GUARDED_KEY, None) or {})
    for f in GUARD_FIELDS:
        v = getattr(cfg, f, None)
        if isinstance(v, str) and v != GUARD:
            saved[f] = v
            setattr(cfg, f, GUARD)
    if saved:
        setattr(cfg, GUARDED_KEY, saved)


def unguard_dict(d: dict) -> dict:
    """A config dict with the real activation fields restored and the marker removed."""
    d = dict(d)
    d.update(d.pop(GUARDED_KEY, None) or {})
    return d


def real_attr(cfg, field: str):
    """A config attribute, seen through the guard."""
    return (getattr(cfg, GUARDED_KEY, None) or {}).get(field, getattr(cfg, field, None))


def needs_guard(model_config: dict) -> bool:
    """Whether plain transformers would load a run dir wrong: it tapers, or it is our GPT-2-style model."""
    return model_config.get("taper_mode", "baseline") != "baseline" or model_config.get("arch") == "gpt2"


def run_dir_hf_fields(model_config: dict, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """HF fields describing a run dir's architecture (ModelConfig dict in), merged into its config.json."""
    c = model_config
    out: dict = {"vocab_size": c["vocab_size"], "bos_token_id": bos_id, "eos_token_id": eos_id}
    if c.get("arch", "llama") == "llama":
        out.update(hidden_size=c["dim"], intermediate_size=c["hidden_dim"], num_hidden_layers=c["n_layers"],
                   num_attention_heads=c["n_heads"], num_key_value_heads=c["n_heads"],
                   head_dim=c["dim"] // c["n_heads"], rms_norm_eps=c["norm_eps"],
                   rope_parameters={"rope_theta": c["rope_theta"], "rope_type": "default"},
                   max_position_embeddings=c["max_seq_len"], hidden_act="silu", attention_bias=False,
                   mlp_bias=False)
    else:  # described for readers; the weights use our own key names, so it is always guarded
        out.update(n_embd=c["dim"], n_layer=c["n_layers"], n_head=c["n_heads"], n_inner=c["hidden_dim"],
                   n_positions=c["max_seq_len"], layer_norm_epsilon=c["norm_eps"], activation_function="gelu_new")
    if needs_guard(c):
        out[ACT_FIELDS[c.get("arch", "llama")]] = GUARD
    return out


def tokenizer_config(bos: str | None, eos: str | None, unk: str | None, max_len: int | None,
                     add_bos: bool = True) -> dict:
    """tokenizer_config.json for a SentencePiece tokenizer.model: encode exactly like SentencePiece, add BOS
    (our runtime's behaviour; training streams carry EOS between documents and no BOS)."""
    cfg = {"tokenizer_class": "TokenizersBackend", "legacy": True, "add_bos_token": bool(add_bos),
           "add_eos_token": False, "bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": None,
           "clean_up_tokenization_spaces": False}
    if max_len:
        cfg["model_max_length"] = int(max_len)
    return cfg


def sp_tokenizer_info(tokenizer_path, max_len: int | None = None) -> tuple[tuple[int | None, int | None], dict]:
    """((bos_id, eos_id), tokenizer_config dict) of a SentencePiece tokenizer.model (ids < 0 become None)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None
    bos, eos, unk = sp.bos_id(), sp.eos_id(), sp.unk_id()
    cfg = tokenizer_config(piece(bos), piece(eos), piece(unk), max_len, add_bos=bos >= 0)
    return (bos if bos >= 0 else None, eos if eos >= 0 else None), cfg
