"""The onnxruntime decode loop against the PyTorch static-cache reference; stop tokens; streaming."""
import numpy as np
import pytest
import torch

from tapernorm.runtime import (DecoderSession, Generator, OrtDecoder, SamplingParams, generate_ids, load_tokenizer,
                               pad_prompts)
from tapernorm.runtime.torch_ref import TorchRefDecoder, greedy_full_forward


@pytest.fixture
def session(compiled_dir):
    return DecoderSession(compiled_dir, provider="cpu", intra_op_threads=1)


def test_ort_greedy_equals_torch_ref(session, tiny_model):
    prompts = [[1, 5, 6, 7, 8, 9], [1, 40, 41]]  # the second is left-padded
    ort_r = generate_ids(OrtDecoder(session), prompts, max_new_tokens=24)
    ref_r = generate_ids(TorchRefDecoder(tiny_model, batch=2), prompts, max_new_tokens=24)
    assert ort_r.tokens == ref_r.tokens
    assert ort_r.tokens[0] == greedy_full_forward(tiny_model, torch.tensor([prompts[0]]), 24)[0].tolist()
    assert len(set(ort_r.tokens[0])) > 3
    assert ort_r.providers == ["CPUExecutionProvider"] and ort_r.decode_steps == 23


def test_ort_step_logits_match_torch(session, tiny_model):
    ids = np.array([[1, 9, 8, 7, 6]])
    ort_dec, ref = OrtDecoder(session), TorchRefDecoder(tiny_model, batch=1)
    a, b = ort_dec.start(ids), ref.start(ids)
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
    for t in (3, 4, 5):
        a, b = ort_dec.step(np.array([t])), ref.step(np.array([t]))
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
    assert ort_dec.length == ref.length == 8


def test_seeded_sampling_is_reproducible_and_matches_torch(session, tiny_model):
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=11)
    a = generate_ids(OrtDecoder(session), [[1, 5, 6]], max_new_tokens=16, sampling=params).tokens
    b = generate_ids(OrtDecoder(session), [[1, 5, 6]], max_new_tokens=16, sampling=params).tokens
    c = generate_ids(TorchRefDecoder(tiny_model), [[1, 5, 6]], max_new_tokens=16, sampling=params).tokens
    other = generate_ids(OrtDecoder(session), [[1, 5, 6]], max_new_tokens=16,
                         sampling=SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=12)).tokens
    assert a == b == c and a != other


def test_stop_tokens_per_row(session):
    prompts = [[1, 5, 6, 7, 8, 9], [1, 40, 41]]
    free = generate_ids(OrtDecoder(session), prompts, max_new_tokens=20).tokens
    stop = free[0][4]  # a token row 0 produces at step 4
    r = generate_ids(OrtDecoder(session), prompts, max_new_tokens=20, stop_ids=[stop])
    assert r.tokens[0] == free[0][:free[0].index(stop)] and r.stop_reasons[0] == "stop"
    if stop in free[1]:
        assert r.tokens[1] == free[1][:free[1].index(stop)]
    else:
        assert r.tokens[1] == free[1] and r.stop_reasons[1] == "length"
    # every row stopped at the first token -> nothing generated, no decode steps
    r = generate_ids(OrtDecoder(session), prompts[:1], max_new_tokens=20, stop_ids=[free[0][0]])
    assert r.tokens == [[]] and r.decode_steps == 0 and r.stop_reasons == ["stop"]


def test_context_limit(session):
    r = generate_ids(OrtDecoder(session), [[1] + [7] * 60], max_new_tokens=20)  # 61 + 3 = the 64-token context
    assert r.stop_reasons == ["context"] and len(r.tokens[0]) == 3  # as onnxruntime-genai's max_length counts
    with pytest.raises(ValueError) as e:
        OrtDecoder(session).start(np.ones((1, 64), dtype=np.int64))
    assert "64-token context" in str(e.value) and "\n" not in str(e.value)


def test_generator_streams_text(compiled_dir):
    g = Generator(compiled_dir, provider="cpu", threads=1)
    holder = {}
    pieces = list(g.stream("once upon a time", max_new_tokens=20, result=holder, stop_ids=[]))
    r = holder["result"]
    tok = load_tokenizer(compiled_dir / "tokenizer.model")
    prompt_ids = [1] + tok.encode("once upon a time")
    full = tok.decode(prompt_ids + r.tokens[0])
    assert len(r.tokens[0]) == 20 and len(pieces) > 1
    assert tok.decode(prompt_ids) + "".join(pieces) == full
    assert g.generate("once upon a time", max_new_tokens=20, stop_ids=[]) == "".join(pieces)


def test_generator_prompt_too_long(compiled_dir):
    g = Generator(compiled_dir, provider="cpu", threads=1)
    with pytest.raises(ValueError) as e:
        g.generate("once upon a time " * 40, max_new_tokens=4)
    msg = str(e.value)
    assert "context is 64" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="max_new_tokens -1"):
        g.stream("hi", max_new_tokens=-1)  # checked eagerly, before any text is produced


def test_pad_prompts_rejects_empty():
    with pytest.raises(ValueError):
        pad_prompts([[1, 2], []])
    ids, mask = pad_prompts([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_folded_and_unfused_graphs_decode_identically(compiled_dir, tiny_model):
    prompts = [[1, 5, 6, 7, 8, 9], [1, 40, 41]]
    folded = DecoderSession(compiled_dir, provider="cpu", intra_op_threads=1)
    unfused = DecoderSession(compiled_dir, variant="model_unfused.onnx", provider="cpu", intra_op_threads=1)
    a = generate_ids(OrtDecoder(folded), prompts, max_new_tokens=16).tokens
    b = generate_ids(OrtDecoder(unfused), prompts, max_new_tokens=16).tokens
    c = generate_ids(TorchRefDecoder(tiny_model, batch=2), prompts, max_new_tokens=16).tokens
    assert a == b == c


def test_iobinding_path_equals_plain_path():
    """The IOBinding path (the one CUDA uses) decodes exactly like the CPU feed-dict path (generic graph)."""
    from rt_util import compiled_tiny_dir
    session = DecoderSession(compiled_tiny_dir(graph="generic"), provider="cpu", intra_op_threads=1)
    prompts = [[1, 5, 6, 7, 8, 9], [1, 40, 41]]
    plain = OrtDecoder(session, io_binding=False)
    bound = OrtDecoder(session, io_binding=True)
    assert not plain.io_binding and bound.io_binding
    a = generate_ids(plain, prompts, max_new_tokens=12).tokens
    b = generate_ids(bound, prompts, max_new_tokens=12).tokens
    assert a == b
    ids, mask = pad_prompts(prompts)
    la, lb = plain.start(ids, mask), bound.start(ids, mask)
    np.testing.assert_array_equal(la, lb)
    for t in (3, 4):
        np.testing.assert_array_equal(plain.step(np.array([t, t])), bound.step(np.array([t, t])))
