"""capture(): one path for our models, a user's module and HF models; the captured module is called like the
original and returns the same outputs; inputs the model cannot take give one clear error."""
import pytest
import torch
import torch.fx as fx

from tiny_models import make_tiny
from passes_models import make_fused, make_hf
from tapernorm.passes.capture import CaptureError, capture
from tapernorm.passes import fold, materialize

IDS = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(5))


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["tiny", "tiny-gpt2"])
def test_capture_reference_model_same_outputs_and_module_stack(arch):
    model = make_tiny(arch, "all")
    gm = capture(model, (IDS,))
    assert isinstance(gm, fx.GraphModule)
    stacks = [v[0] for n in gm.graph.nodes for v in (n.meta.get("nn_module_stack") or {}).values()]
    assert "layers.0.input_layernorm" in stacks and "norm" in stacks  # the passes find TaperNorm calls by this
    other = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _same(gm(other), model(other))
        # the KV-cache call (past + presents) captures through the same path
        _, past = model(IDS, use_cache=True)
        pos = torch.arange(6, 7).expand(2, 1)
        mask = torch.ones(2, 7, dtype=torch.long)
        args = (IDS[:, :1], mask, pos, past)
        gkv = capture(model, args)
        for a, b in zip(torch.utils._pytree.tree_leaves(gkv(*args)), torch.utils._pytree.tree_leaves(model(*args))):
            _same(a, b)


def test_capture_user_module_and_hf_kwargs():
    user = make_fused()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        _same(capture(user, (x,))(x), user(x))
    hf = make_hf("llama", "all")
    gm = capture(hf, (), {"input_ids": IDS, "use_cache": False})
    with torch.no_grad():
        _same(gm(input_ids=IDS, use_cache=False).logits, hf(input_ids=IDS, use_cache=False).logits)


def test_inputs_the_model_cannot_take_are_one_clear_error():
    model = make_tiny("tiny", "internal")
    with pytest.raises(CaptureError) as e:
        capture(model, (torch.randn(2, 6),))  # float ids
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("torch.export could not capture DecoderLM") and "example inputs" in msg
    for run in (fold, materialize):
        with pytest.raises(ValueError, match=r"^\w+: DecoderLM fails on the example inputs \(RuntimeError: .*\); pass"):
            run(model, (torch.randn(2, 6),))
    with pytest.raises(TypeError, match="expected an nn.Module"):
        capture(lambda x: x, (IDS,))
