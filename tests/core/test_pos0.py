"""Position 0's own scale c0 (tapernorm/pos0.py): calibration, gate-1 invariance, cached decode == full forward at
gates 0.5 and 0 (our DecoderLM, a tiny HF Llama, Qwen3's (B, T, H, d) and Gemma 3's (B, H, T, d) per-head QK-norms:
token_dim), and save / load round trips that keep c0 (and the family's token_dim)."""
import pytest
import torch

from tapernorm import build_model, calibrate, set_gate, taper_layers
from tapernorm.checkpoint import load_checkpoint, save_checkpoint
from tapernorm.pos0 import pos0_factor, pos0_ratio

VOCAB = 256


def _batches(n=3, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (2, 12), generator=g) for _ in range(n)]


def _decoder(pos0=True):
    torch.manual_seed(0)
    m = build_model("tiny", taper_mode="internal", n_heads=2)
    with torch.no_grad():
        m.embed_tokens.weight.mul_(20)
    m.eval()
    before = m(_batches(1, seed=5)[0])
    calibrate(m, _batches(), pos0=pos0)
    if pos0:  # random ids have no attention sink (c0 ~ c): make position 0's scale clearly its own
        for _, l in taper_layers(m):
            l.c0.mul_(0.5)
    return m, before


def _llama():
    transformers = pytest.importorskip("transformers")
    from tapernorm import taperize
    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    taperize(m, "internal")
    calibrate(m, _batches(), forward=lambda mod, b: mod(input_ids=b, use_cache=False), pos0=True)
    for _, l in taper_layers(m):  # no sink in random ids: make position 0's scale clearly its own
        l.c0.mul_(0.5)
    return m


def test_calibration_sets_c0_and_gate_one_is_unchanged():
    m, before = _decoder()
    layers = taper_layers(m)
    assert layers and all(l.has_pos0 and float(l.c0) > 0 and float(l.c0) != float(l.c) for _, l in layers)
    assert "c0=" in repr(layers[0][1])
    with torch.no_grad():
        assert torch.equal(m(_batches(1, seed=5)[0]), before)  # gate 1: the plain norm, c0 unused
    plain, _ = _decoder(pos0=False)
    assert not any(l.has_pos0 for _, l in taper_layers(plain)) and float(taper_layers(plain)[0][1].c0) == 0


def test_factor_is_ratio_at_position_zero_only():
    m, _ = _decoder()
    layer = taper_layers(m)[0][1]
    x = torch.randn(2, 5, 32)
    p = pos0_factor(layer, x)  # no hook rows: row 0 of the sequence
    assert p.shape == (5, 1) and torch.allclose(p[0, 0], pos0_ratio(layer)) and torch.equal(p[1:], torch.ones(4, 1))
    layer.pos0_rows = torch.tensor([[False, True, False, False, False], [True, False, False, False, False]])
    p = pos0_factor(layer, x)  # (B, T, 1): a left-padded row's first real token is its position 0
    assert p.shape == (2, 5, 1) and p[0, 1, 0] == p[1, 0, 0] == pos0_ratio(layer)
    assert int((p != 1).sum()) == 2
    layer.pos0_rows = None


@torch.no_grad()
def _decoder_cached(m, ids):
    """Last-position logits of a prefill of ids[:, :6] then one token at a time (positional call as compile does)."""
    out, past, pos = [], None, 0
    for chunk in (ids[:, :6], *ids[:, 6:].split(1, dim=1)):
        T = chunk.shape[1]
        logits, past = m(chunk, torch.ones(ids.shape[0], pos + T, dtype=torch.long),
                         torch.arange(pos, pos + T)[None].expand(ids.shape[0], T), past, use_cache=True)
        out.append(logits[:, -1])
        pos += T
    return torch.stack(out, 1)


@pytest.mark.parametrize("gate", [0.5, 0.0])
def test_decoder_cached_decode_matches_full_forward(gate):
    m, _ = _decoder()
    set_gate(m, gate)
    ids = _batches(1, seed=3)[0]
    with torch.no_grad():
        full = m(ids)[:, 5:]  # (B, 7, V): positions 5..11
        cached = _decoder_cached(m, ids)
        # no position ids at all: the pre-hook infers "not position 0" from the cache length
        logits, past = m(ids[:, :6], use_cache=True)
        step, _ = m(ids[:, 6:7], past_key_values=past, use_cache=True)
    assert torch.allclose(cached, full, atol=1e-4), float((cached - full).abs().max())
    assert torch.allclose(step[:, -1], full[:, 1], atol=1e-4)
    if gate == 0.0:  # the factor matters: without c0 position 0's logits change, the others' rows do not see it
        with torch.no_grad():
            first = m(ids)[:, 0]
            for _, l in taper_layers(m):
                l.has_pos0 = False
            assert (m(ids)[:, 0] - first).abs().max() > 1e-2


@pytest.mark.parametrize("gate", [0.5, 0.0])
def test_hf_llama_cached_decode_matches_full_forward(gate):
    m = _llama()
    assert all(l.has_pos0 for _, l in taper_layers(m))
    set_gate(m, gate)
    ids = _batches(1, seed=3)[0]
    with torch.no_grad():
        full = m(input_ids=ids, use_cache=False).logits
        out = m(input_ids=ids[:, :6], use_cache=True)
        cache, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(6, ids.shape[1]):
            out = m(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
        gen = m.generate(ids[:, :6], max_new_tokens=4, do_sample=False, attention_mask=torch.ones(2, 6, dtype=torch.long))
    cached = torch.stack(steps, 1)
    assert torch.allclose(cached, full[:, 5:], atol=1e-4), float((cached - full[:, 5:]).abs().max())
    with torch.no_grad():  # generate's cached tokens == full-forward greedy
        toks = ids[:, :6]
        for _ in range(4):
            toks = torch.cat([toks, m(input_ids=toks, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, toks)


def test_save_load_round_trips_keep_c0(tmp_path):
    from tapernorm.hf import from_pretrained, save_pretrained
    m = _llama()
    set_gate(m, 0.0)
    ids = _batches(1, seed=4)[0]
    save_pretrained(m, tmp_path / "hf")
    back = from_pretrained(tmp_path / "hf")
    c0 = {n: float(l.c0) for n, l in taper_layers(m)}
    assert {n: float(l.c0) for n, l in taper_layers(back)} == c0 and all(l.has_pos0 for _, l in taper_layers(back))
    assert getattr(back, "_tapernorm_pos0_hook", None) is not None  # cached decode knows position 0
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids, use_cache=False).logits, m(input_ids=ids, use_cache=False).logits)
    d, _ = _decoder()
    set_gate(d, 0.0)
    save_checkpoint(d, tmp_path / "run")
    d2, _ = load_checkpoint(tmp_path / "run")
    assert [float(l.c0) for _, l in taper_layers(d2)] == [float(l.c0) for _, l in taper_layers(d)]
    with torch.no_grad():
        assert torch.equal(d2(ids), d(ids))
        assert torch.allclose(_decoder_cached(d2, ids), d(ids)[:, 5:], atol=1e-4)


def test_files_without_c0_still_load():
    m, _ = _decoder(pos0=False)
    sd = {k: v for k, v in m.state_dict().items() if not k.endswith(".c0")}  # written before c0 existed
    m2, _ = _decoder(pos0=True)
    m2.load_state_dict(sd)
    assert not any(l.has_pos0 for _, l in taper_layers(m2)) and all(float(l.c0) == 0 for _, l in taper_layers(m2))


def test_per_head_norms_calibrate_and_scale_position_zero_not_head_zero():
    """Qwen3's q_norm / k_norm see (B, T, H, d): position is dim 1, and c0 / the factor follow it."""
    transformers = pytest.importorskip("transformers")
    from tapernorm.layers import calibrate, set_gate, taper_layers, taperize
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    m = transformers.Qwen3ForCausalLM(cfg).eval()
    taperize(m, "internal")
    ids = torch.randint(0, 100, (2, 12))
    calibrate(m, [ids], forward=lambda mm, b: mm(input_ids=b, use_cache=False), skip_positions=1, stat="inv_rms",
              pos0=True)
    q = dict(taper_layers(m))["model.layers.0.self_attn.q_norm"]
    seen = []
    h = q.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach()))
    set_gate(m, 1.0)
    with torch.no_grad():
        m(input_ids=ids, use_cache=False)
    h.remove()
    r_inv = torch.rsqrt(seen[0].pow(2).mean(-1) + q.eps)  # (B, T, H)
    assert float(q.c0) == pytest.approx(float(r_inv[:, 0].mean()), rel=1e-5)
    assert float(q.c) == pytest.approx(float(r_inv[:, 1:].mean()), rel=1e-5)
    for g in (0.5, 0.0):
        set_gate(m, g)
        _cached_decode_equals_full(m, ids)


def _cached_decode_equals_full(m, ids) -> torch.Tensor:
    """A prefill of 8 tokens then 4 cached single-token steps give the full forward's logits (12 tokens); returns
    the full forward's logits."""
    with torch.no_grad():
        full = m(input_ids=ids, use_cache=False).logits
        out = m(input_ids=ids[:, :8], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(8, 12):
            o = m(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(o.logits)
            cache = o.past_key_values
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    return full


def _gemma3(pos0=True, **calib):
    """A tiny tapered Gemma 3 (4 q / 2 kv heads of 8, sliding window 4): its q_norm / k_norm see (B, H, T, d)."""
    transformers = pytest.importorskip("transformers")
    from tapernorm.layers import calibrate, taperize
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                        max_position_embeddings=64)
    m = transformers.Gemma3ForCausalLM(cfg).eval()
    taperize(m, "internal")
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    calibrate(m, [ids], forward=lambda mm, b: mm(input_ids=b, use_cache=False), pos0=pos0, **calib)
    return m, ids


def test_gemma3_qk_norms_calibrate_position_zero_on_dim_2():
    """taperize gives Gemma 3's QK-norms token_dim 2 (from the family, HEADS_FIRST_NORMS); c0 is the mean 1 / r over
    every head at position 0 of their (B, H, T, d) input (not head 0 at every position), and --calib-skip leaves
    position 0 out of c on that axis: both checked against a hand computation on the recorded inputs."""
    m, ids = _gemma3(skip_positions=1, stat="inv_rms")
    layers = dict(taper_layers(m))
    qk = {n for n in layers if n.endswith(("q_norm", "k_norm"))}
    assert len(qk) == 4 and {n for n, l in layers.items() if l.token_dim == 2} == qk
    assert "token_dim=2" in repr(layers["model.layers.0.self_attn.k_norm"])
    seen = {}
    hooks = [layers[n].register_forward_pre_hook(lambda mod, inp, n=n: seen.setdefault(n, inp[0].detach()))
             for n in qk]
    with torch.no_grad():
        m(input_ids=ids, use_cache=False)  # gate 1: the inputs calibration saw
    for h in hooks:
        h.remove()
    for n in qk:
        x, l = seen[n], layers[n]
        assert x.shape == (2, 4 if "q_norm" in n else 2, 12, 8)  # (B, H, T, d)
        r_inv = torch.rsqrt(x.pow(2).mean(-1) + l.eps)  # (B, H, T)
        assert float(l.c0) == pytest.approx(float(r_inv[:, :, 0].mean()), rel=1e-5)
        assert float(l.c) == pytest.approx(float(r_inv[:, :, 1:].mean()), rel=1e-5)
        assert abs(float(r_inv[:, 0].mean()) - float(l.c0)) > 1e-3 * float(l.c0)  # head 0 would differ


def test_gemma3_factor_scales_position_zero_of_every_head():
    m, _ = _gemma3()
    layer = dict(taper_layers(m))["model.layers.0.self_attn.q_norm"]
    x = torch.randn(2, 4, 5, 8)  # (B, H, T, d)
    p = pos0_factor(layer, x)  # no hook rows: row 0 of the token axis
    assert p.shape == (5, 1) and torch.allclose(p[0, 0], pos0_ratio(layer)) and torch.equal(p[1:], torch.ones(4, 1))
    layer.pos0_rows = torch.tensor([[False, True, False, False, False], [True, False, False, False, False]])
    p = pos0_factor(layer, x)  # (B, 1, T, 1): a left-padded row's first real token, in every head
    assert p.shape == (2, 1, 5, 1) and p[0, 0, 1, 0] == p[1, 0, 0, 0] == pos0_ratio(layer)
    assert int((p != 1).sum()) == 2 and (layer.fixed_map(x) / (x * layer.taper_scale()))[0, :, 1].sub(
        pos0_ratio(layer)).abs().max() < 1e-5
    layer.pos0_rows = None
    layer.token_dim = 3
    from tapernorm import TaperError
    with pytest.raises(TaperError, match=r"^TaperNorm token_dim 3 does not fit an input of rank 4 "):
        pos0_factor(layer, x)


@pytest.mark.parametrize("gate", [0.5, 0.0])
def test_gemma3_cached_decode_matches_full_forward(gate):
    """With the pre-hook's (B, T) rows the (B, H, T, d) QK-norms scale position 0 only (this crashed on a shape
    mismatch before token_dim): a prefill of 8 then 4 cached steps == the full forward, across the sliding window."""
    from tiny_models import sharpen_pos0
    m, ids = _gemma3()
    sharpen_pos0(m)
    set_gate(m, gate)
    full = _cached_decode_equals_full(m, ids)
    if gate == 0.0:  # the QK-norms' factor is live: without it position 0's q / k change what every row sees
        with torch.no_grad():
            for n, l in taper_layers(m):
                l.has_pos0 = l.has_pos0 and not n.endswith(("q_norm", "k_norm"))
            assert (m(input_ids=ids, use_cache=False).logits - full).abs().max() > 1e-4


def test_gemma3_token_dim_survives_save_load(tmp_path):
    """token_dim is not saved: from_pretrained sets it from the family again (so directories written before it
    existed load right), for save_pretrained directories and transformers' own save alike; either way the model
    (not each layer) gets the position pre-hook, so cached decode after loading == the full forward."""
    from tapernorm.hf import from_pretrained, save_pretrained
    m, ids = _gemma3()
    set_gate(m, 0.0)
    save_pretrained(m, tmp_path / "tapered")
    m.save_pretrained(tmp_path / "own")
    want = {n: l.token_dim for n, l in taper_layers(m)}
    with torch.no_grad():
        ref = m(input_ids=ids, use_cache=False).logits
    for d in ("tapered", "own"):
        back = from_pretrained(tmp_path / d)
        assert {n: l.token_dim for n, l in taper_layers(back)} == want, d
        hooked = [n for n, mod in back.named_modules() if getattr(mod, "_tapernorm_pos0_hook", None) is not None]
        assert hooked == [""], (d, hooked)
        with torch.no_grad():
            torch.testing.assert_close(back(input_ids=ids, use_cache=False).logits, ref, rtol=0, atol=1e-6)
            out = back(input_ids=ids[:, :8], use_cache=True)
            step = back(input_ids=ids[:, 8:9], cache=out.past_key_values, use_cache=True).logits
        torch.testing.assert_close(step[:, -1], ref[:, 8], rtol=1e-5, atol=1e-5)


def test_rms_loss_skips_positions_on_the_token_axis():
    """The RMS loss's --calib-skip leaves position 0 out on each norm's token axis: a sink at position 0 of a
    (B, H, T, d) input (token_dim 2) adds nothing once skipped."""
    from tapernorm.layers import TaperNorm
    from tapernorm.train.rms_loss import NormRmsLoss
    layer = TaperNorm(8)
    layer.token_dim = 2
    layer.calibrated, layer.c = True, torch.tensor(1.0)
    x = torch.randn(2, 3, 6, 8)
    loss = NormRmsLoss(torch.nn.Sequential(layer).train(), lam=1.0, skip_positions=1)
    sink = x.clone()
    sink[:, :, 0] *= 100.0
    vals = []
    for inp in (x, sink):
        loss.clear()
        layer(inp)
        vals.append(float(loss.loss()))
    assert vals[0] == pytest.approx(vals[1], rel=1e-6)
    want = (0.5 * torch.log(x[:, :, 1:].pow(2).mean(-1) + 1e-12)).pow(2).mean()
    assert vals[0] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("model_type,extra,n_heads_first", [
    ("phi", {"qk_layernorm": True}, 4), ("stablelm", {"qk_layernorm": True}, 12), ("exaone4", {}, 4),
    ("apertus", {}, 4)])
def test_other_heads_first_families_calibrate_c0_on_dim_2(model_type, extra, n_heads_first):
    """The rest of HEADS_FIRST_NORMS (QK-norms called after `.transpose(1, 2)`; Stable LM's one LayerNorm per head,
    each on (B, 1, T, d)): taperize gives exactly those token_dim 2, c0 is position 0's mean 1 / r over the heads
    (hand computation; LayerNorms centred), and at gate 0 cached decode == the full forward."""
    transformers = pytest.importorskip("transformers")
    from tapernorm import taperize
    from tiny_models import sharpen_pos0
    transformers.logging.set_verbosity_error()
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=100, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    taperize(m, "all")
    heads_first = {n: l for n, l in taper_layers(m) if l.token_dim == 2}
    assert len(heads_first) == n_heads_first and all("_norm" in n or "_layernorm" in n for n in heads_first)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    seen = {}
    hooks = [l.register_forward_pre_hook(lambda mod, inp, n=n: seen.setdefault(n, inp[0].detach()))
             for n, l in heads_first.items()]
    calibrate(m, [ids], forward=lambda mm, b: mm(input_ids=b, use_cache=False), pos0=True)
    for h in hooks:
        h.remove()
    for n, l in heads_first.items():
        x = seen[n]  # (B, H, T, d)
        x = x - x.mean(-1, keepdim=True) if "layernorm" in n else x
        assert float(l.c0) == pytest.approx(float(torch.rsqrt(x.pow(2).mean(-1) + l.eps)[:, :, 0].mean()), rel=1e-5)
    set_gate(sharpen_pos0(m), 0.0)
    _cached_decode_equals_full(m, ids)
