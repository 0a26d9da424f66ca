"""genai_config.json: every end token the checkpoint names reaches onnxruntime-genai (a list, as its builder writes)."""
from tapernorm.compiler.lean.families import DecoderDims
from tapernorm.compiler.lean.genai import genai_config

DIMS = DecoderDims(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, hidden=32, vocab=100, max_seq_len=64)


def test_eos_ids_become_a_list_and_out_of_vocab_ids_are_dropped():
    m = genai_config(DIMS, eos_ids=[2, 7, 500], bos_id=1)["model"]
    assert m["eos_token_id"] == [2, 7] and m["pad_token_id"] == 2 and m["bos_token_id"] == 1


def test_one_eos_stays_an_int_and_none_falls_back_to_zero():
    assert genai_config(DIMS, eos_ids=[3])["model"]["eos_token_id"] == 3
    assert genai_config(DIMS, eos_id=5)["model"]["eos_token_id"] == 5
    assert genai_config(DIMS)["model"]["eos_token_id"] == 0
