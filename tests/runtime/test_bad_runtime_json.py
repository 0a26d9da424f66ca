"""The runtime checks runtime.json before trusting it, and `generate` checks its flags (issue 11): every bad
value is one line naming the file or flag, before any allocation or decode."""
import json
import shutil

import pytest

from tapernorm.compiler.cli import main
from tapernorm.runtime import DecoderSession, ModelDirError


def _copy(compiled_dir, dst, **runtime):
    for f in ("model.onnx", "runtime.json", "config.json", "tokenizer.model"):
        shutil.copy(compiled_dir / f, dst / f)
    rt = json.loads((dst / "runtime.json").read_text())
    rt.update(runtime)
    (dst / "runtime.json").write_text(json.dumps(rt))
    return dst


BAD = [
    ({"max_seq_len": "abc"}, r"runtime\.json: max_seq_len is 'abc' \(str\) but must be an integer"),
    ({"max_seq_len": 1e13}, r"max_seq_len is 10000000000000\.0 \(float\) but must be an integer"),
    ({"max_seq_len": 10 ** 13}, r"max_seq_len = 10000000000000 is outside \[1, 1048576\]"),
    ({"max_seq_len": -5}, r"max_seq_len = -5 is outside \[1, "),
    ({"max_seq_len": True}, r"max_seq_len is True \(bool\) but must be an integer"),
    ({"vocab_size": "256"}, r"vocab_size is '256' \(str\)"),
    ({"dtype": "float64"}, r"dtype 'float64' is not float32, float16 or bfloat16"),
    ({"eos_id": 99999}, r"eos_id is 99999 but must be null, -1 or a token id below vocab_size 256"),
    ({"n_heads": 0}, r"n_heads = 0 is outside"),
    ({"eos_ids": [2, 300]}, r"eos_ids is \[2, 300\] but must be a list of token ids below vocab_size 256"),
    ({"eos_ids": 2}, r"eos_ids is 2 but must be a list"),
    ({"add_bos": "yes"}, r"add_bos is 'yes' but must be true, false or null"),
    ({"tokenizer": "../x.json"}, r"tokenizer is '../x.json' but must be"),
]


@pytest.mark.parametrize("edit,msg", BAD, ids=[f"{k}={v!r}" for e, _ in BAD for k, v in e.items()])
def test_bad_runtime_json_value_is_one_line(compiled_dir, tmp_path, edit, msg):
    d = _copy(compiled_dir, tmp_path, **edit)
    with pytest.raises(ModelDirError, match=msg) as e:
        DecoderSession(d, intra_op_threads=1)
    assert "\n" not in str(e.value) and "tapernorm compile" in str(e.value)


def test_bad_context_in_config_json_fallback(compiled_dir, tmp_path):
    d = _copy(compiled_dir, tmp_path)
    rt = json.loads((d / "runtime.json").read_text())
    del rt["max_seq_len"]
    (d / "runtime.json").write_text(json.dumps(rt))
    assert DecoderSession(d, intra_op_threads=1).config.max_seq_len == 64  # from config.json
    cfg = json.loads((d / "config.json").read_text())
    cfg["tapernorm"]["max_seq_len"] = "64"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match=r"config\.json: max_seq_len is '64'"):
        DecoderSession(d, intra_op_threads=1)


def test_no_context_limit_anywhere_is_refused(compiled_dir, tmp_path, capsys):
    d = _copy(compiled_dir, tmp_path)
    (d / "runtime.json").unlink()
    (d / "config.json").unlink()
    assert main(["generate", str(d), "--prompt", "The", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot tell the context limit" in err[0], err


@pytest.mark.parametrize("flags,msg", [
    (["--prompt", b"caf\xe9 ok".decode("utf-8", "surrogateescape")], r"--prompt is not valid UTF-8 text \(byte 0xe9 at offset 3\)"),
    (["--prompt", "The", "--threads", "-2"], r"--threads -2 must be >= 1"),
    (["--prompt", "The", "--threads", "0"], r"--threads 0 must be >= 1"),
    (["--prompt", "The", "--stop-token", "99999"], r"--stop-token 99999 is not a token id of this model \(its vocabulary is 0\.\.255\)"),
    (["--prompt", "The", "--stop-token", "-1"], r"--stop-token -1 is not a token id"),
], ids=["non-utf8-prompt", "threads-negative", "threads-zero", "stop-token-beyond-vocab", "stop-token-negative"])
def test_bad_generate_flags_are_one_line(compiled_dir, capsys, flags, msg):
    import re
    assert main(["generate", str(compiled_dir), *flags]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and re.search(msg, err[0]), err
    assert captured.out == ""  # nothing printed before the refusal
