"""`tapernorm finetune --taper-bound B [--taper-bound-scope mlp|all]`: the MLP-input norms (or every tapered norm)
taper to the bounded map (tapernorm/bound.py), the rest to the linear map; the flags' refusals; a fine-tuned model
compiles with one Tanh per bounded norm."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))

from tapernorm.train.finetune_cli import FinetuneConfig  # noqa: E402


@pytest.mark.parametrize("kw,match", [
    ({"taper_bound": -1.0}, "--taper-bound -1.0 must be a finite number >= 0"),
    ({"taper_bound": float("inf")}, "--taper-bound inf must be a finite number >= 0"),
    ({"taper_bound": 8.0, "keep_mlp_norms": True, "taper_bound_scope": "mlp"}, "pass one of the two"),
    ({"taper_bound": 8.0, "taper_bound_scope": "heads"}, "--taper-bound-scope 'heads' is not one of mlp, all"),
    ({"taper_bound_rms": -4.0}, "--taper-bound-rms -4.0 must be a finite number >= 0"),
    ({"taper_bound_rms": 4.0, "taper_bound": 8.0}, "two forms of the same bound; pass one of the two"),
    ({"taper_bound_rms": 4.0, "keep_mlp_norms": True, "taper_bound_scope": "mlp"}, "pass one of the two"),
])
def test_taper_bound_refusals(kw, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(model="m", steps=10, recipe="paper", **kw).check()


def test_taper_bound_defaults_off_and_bounds_every_tapered_norm_when_on():
    assert FinetuneConfig(model="m", steps=10, recipe="sink-attn").check().taper_bound == 0.0
    assert FinetuneConfig(model="m", steps=10, recipe="sink", taper_bound_rms=3.0).check().taper_bound_scope == "all"


def test_keeping_the_mlp_norms_and_bounding_the_rest_is_allowed():
    cfg = FinetuneConfig(model="m", steps=10, recipe="paper", taper_bound=8.0, taper_bound_scope="all",
                         keep_mlp_norms=True).check()
    assert cfg.keep_mlp_norms and cfg.taper_bound == 8.0


def test_layernorm_family_is_refused_in_one_line(tmp_path):
    from hf_models import FT_ARGS, hf_dir
    from tapernorm.compiler.cli import main
    with pytest.raises(ValueError, match=r"--taper-bound: transformer\.h\.0\.ln_1 is a LayerNorm"):
        main(["finetune", str(hf_dir("gpt2", tmp_path / "src")), "--out", str(tmp_path / "ft"), *FT_ARGS,
              "--recipe", "paper", "--taper-bound", "8", "--debug"])


BOUNDED = {"mlp": ["model.layers.0.post_attention_layernorm", "model.layers.1.post_attention_layernorm"],
           "all": ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                   "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"]}


@pytest.mark.slow
@pytest.mark.parametrize("scope", sorted(BOUNDED))
def test_finetune_with_taper_bound_tapers_every_norm_and_compiles(tmp_path, scope):
    import tapernorm
    from hf_models import FT_ARGS, hf_dir
    from tapernorm.compiler.cli import main
    out = tmp_path / "ft"
    assert main(["finetune", str(hf_dir("llama", tmp_path / "src")), "--out", str(out), "--mode", "all", *FT_ARGS,
                 "--recipe", "sink", "--taper-bound", "4", "--taper-bound-scope", scope]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["taper_bound"] == 4.0 and not summary["config"]["keep_mlp_norms"]
    layers = dict(tapernorm.taper_layers(tapernorm.from_pretrained(out / "model")))
    assert len(layers) == 5 and all(m.gate == 0.0 for m in layers.values())
    assert sorted(n for n, m in layers.items() if m.has_bound) == BOUNDED[scope]
    assert all(float(m.bound) == 4.0 for m in layers.values() if m.has_bound)
    assert main(["compile", str(out / "model"), "--out", str(tmp_path / "c")]) == 0
    report = json.loads((tmp_path / "c" / "compile_report.json").read_text())
    assert report["parity"]["ok"] and len(report["folded_layers"]) == 5
    n = len(BOUNDED[scope])
    assert report["bound"]["sites"] == n and report["bound"]["model.onnx"]["tanh"] == n
    assert report["parity"]["graphs"]["model.onnx"]["tokens_identical"]


@pytest.mark.slow
def test_finetune_with_a_bound_per_feature_compiles(tmp_path):
    """--taper-bound-rms: each bounded norm's B is measured per feature at calibration, saved with the model, and
    the fine-tuned model compiles with one Tanh per bounded norm."""
    import tapernorm
    from hf_models import FT_ARGS, hf_dir
    from tapernorm.compiler.cli import main
    out = tmp_path / "ft"
    assert main(["finetune", str(hf_dir("llama", tmp_path / "src")), "--out", str(out), "--mode", "internal",
                 *FT_ARGS, "--recipe", "sink", "--taper-bound-rms", "4", "--taper-bound-scope", "all"]) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["taper_bound_rms"] == 4.0
    layers = dict(tapernorm.taper_layers(tapernorm.from_pretrained(out / "model")))
    assert len(layers) == 4 and all(m.has_bound and m.bound.shape == m.weight_t.shape for m in layers.values())
    assert main(["compile", str(out / "model"), "--out", str(tmp_path / "c")]) == 0
    report = json.loads((tmp_path / "c" / "compile_report.json").read_text())
    assert report["parity"]["ok"] and report["bound"]["per_feature"] == 4
    assert report["bound"]["model.onnx"]["tanh"] == 4
