"""The static-KV-cache reference decoder against the model's own full forward (golden greedy decode)."""
import pytest
import torch

from rt_util import diverse_tiny
from tapernorm.runtime.generate import generate_ids, pad_prompts
from tapernorm.runtime.torch_ref import StaticDecoder, TorchRefDecoder, decode_one_token, greedy_full_forward, prefill


def _static_greedy(model, ids, n, mask=None):
    dec = StaticDecoder(model, batch=ids.shape[0])
    logits = prefill(dec, ids, mask)
    out = []
    for i in range(n):
        tok = logits.argmax(-1)  # (B,)
        out.append(tok)
        if i < n - 1:
            logits = decode_one_token(dec, tok)
    return torch.stack(out, 1)


@pytest.mark.parametrize("arch", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("mode", ["internal", "all", "baseline"])
def test_static_cache_greedy_equals_full_forward(arch, mode):
    torch.manual_seed(0)
    model = diverse_tiny(arch, mode)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = greedy_full_forward(model, ids, 24)  # (B, 24), re-runs the whole sequence each step
    got = _static_greedy(model, ids, 24)
    assert torch.equal(got, ref)
    assert len(set(ref.flatten().tolist())) >= 4, "model too degenerate for a meaningful golden test"


def test_static_cache_logits_match_full_forward():
    model = diverse_tiny("tiny", "internal")
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    dec = StaticDecoder(model, batch=1)
    got = [prefill(dec, ids[:, :5])]
    for t in range(5, 9):
        got.append(decode_one_token(dec, ids[:, t]))
    full = model(ids)  # (1, 9, V)
    for i, g in enumerate(got):
        torch.testing.assert_close(g, full[:, 4 + i], atol=1e-4, rtol=1e-4)


def test_left_padded_batch_matches_single_prompts():
    model = diverse_tiny("tiny", "internal")
    prompts = [[5, 6, 7, 8, 9, 10], [40, 41, 42]]
    batched = generate_ids(TorchRefDecoder(model, batch=2), prompts, max_new_tokens=12)
    for b, p in enumerate(prompts):
        single = greedy_full_forward(model, torch.tensor([p]), 12)[0].tolist()
        assert batched.tokens[b] == single


def test_reset_reuses_buffers_and_repeats():
    model = diverse_tiny("tiny", "internal")
    dec = TorchRefDecoder(model, batch=1)
    a = generate_ids(dec, [[7, 8, 9]], max_new_tokens=8).tokens
    ptr = dec.dec.caches[0].k_cache.data_ptr()
    b = generate_ids(dec, [[7, 8, 9]], max_new_tokens=8).tokens
    assert a == b and dec.dec.caches[0].k_cache.data_ptr() == ptr


def test_errors_are_one_line():
    model = diverse_tiny("tiny", "internal")
    dec = StaticDecoder(model, batch=1, max_len=8)
    with pytest.raises(ValueError, match="does not fit") as e:
        prefill(dec, torch.zeros(1, 8, dtype=torch.long))
    assert "\n" not in str(e.value)
    with pytest.raises(RuntimeError, match="before prefill"):
        decode_one_token(StaticDecoder(model, batch=1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        prefill(dec, torch.zeros(2, 3, dtype=torch.long))
    ids, mask = pad_prompts([[1, 2]])
    assert ids.tolist() == [[1, 2]] and mask.tolist() == [[1, 1]]
    # context full -> the generic loop stops with reason "context"
    r = generate_ids(TorchRefDecoder(model, batch=1, max_len=8), [[1, 2, 3, 4, 5]], max_new_tokens=10)
    assert r.stop_reasons == ["context"] and len(r.tokens[0]) == 3  # 5 + 3 = the 8-token context
