"""Real text in and out (issue 18): tokenizer.json through `tokenizers`, every end token in runtime.json, the BOS
rule, chat templates rendered like transformers (sandboxed jinja2), `--stop` strings, `tapernorm chat` keeping the
history, and the same text through `--engine genai`."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rt_util import compiled_tiny_dir
from tapernorm.compiler.tokenizer_files import copy_tokenizer_files, read_tokenizer_files
from tapernorm.runtime.chat import ChatError, ChatHistory, ChatTemplate, load_chat_template, run_chat
from tapernorm.runtime.generate import Generator
from tapernorm.runtime.tokenizer import HFTokenizer, PromptRules, StopStrings, TextStreamer

ROOT = Path(__file__).resolve().parents[2]
GENAI_PY = next((p for p in (os.environ.get("TAPERNORM_GENAI_PYTHON"), str(ROOT / ".venv-genai" / "bin" / "python"))
                 if p and Path(p).is_file()), None)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a tiny model<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tokenizer_json(path: Path, bos_template: bool = False) -> None:
    """A 256-token WordLevel tokenizer.json: 3 special tokens, then words (the tiny model's vocab size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    words = ["system", "user", "assistant", "You", "are", "a", "tiny", "model", "hello", "what", "is", "the",
             "capital", "of", "France", "?", "Paris", "\n"] + [f"w{i}" for i in range(256)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(SPECIALS + words))}
    vocab = {t: i for t, i in vocab.items() if i < 255} | {"[UNK]": 255}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    tk.add_special_tokens(SPECIALS)
    if bos_template:
        tk.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    tk.save(str(path))


def _hf_source(d: Path, bos_template: bool = False, add_bos=None) -> Path:
    """An HF-style checkpoint directory's tokenizer side (no weights: read_tokenizer_files reads only these)."""
    d.mkdir(parents=True, exist_ok=True)
    _tokenizer_json(d / "tokenizer.json", bos_template)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "bos_token_id": 1}))
    cfg = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|endoftext|>"}, "tokenizer_class": "X"}
    if add_bos is not None:
        cfg["add_bos_token"] = add_bos
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text(TEMPLATE)
    return d


def test_every_end_token_and_the_bos_rule(tmp_path):
    tf = read_tokenizer_files(_hf_source(tmp_path / "a"), vocab_size=256)
    # config 2, generation_config [2, 7], tokenizer_config's eos_token <|endoftext|> = 0
    assert tf.eos_ids == [2, 7, 0] and tf.eos_id == 2 and tf.tokenizer == "tokenizer.json"
    assert tf.bos_id == 1 and tf.add_bos is False  # no post-processor BOS, no add_bos_token: SmolLM2's case
    assert read_tokenizer_files(_hf_source(tmp_path / "b", bos_template=True), 256).add_bos is True
    assert read_tokenizer_files(_hf_source(tmp_path / "c", bos_template=True, add_bos=False), 256).add_bos is False
    assert read_tokenizer_files(tmp_path / "a", vocab_size=5).eos_ids == [2, 0]  # out-of-vocab ids are dropped
    out = tmp_path / "out"
    out.mkdir()
    tf = copy_tokenizer_files(tmp_path / "a", out, 256)
    assert sorted(tf.files) == sorted(["tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                       "generation_config.json"])
    assert tf.chat_template and (out / "chat_template.jinja").read_text() == TEMPLATE


def test_run_dir_compile_has_tokenizer_json_and_eos_ids():
    d = compiled_tiny_dir()
    rt = json.loads((d / "runtime.json").read_text())
    assert rt["eos_ids"] == [2] and rt["add_bos"] is True and rt["tokenizer"] == "tokenizer.model"
    # the converted tokenizer.json encodes like SentencePiece (what onnxruntime-genai's og.Tokenizer reads)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    hf = HFTokenizer(d / "tokenizer.json")
    for s in ("once upon a time", "The for statement is used\n  x = 1"):
        assert hf.encode(s) == list(sp.encode(s))
    assert json.loads((d / "tokenizer_config.json").read_text())["add_bos_token"] is True
    ckpt = d.parent / (d.name + "-ckpt")  # the saved checkpoint (a run's model/) got it at save time
    assert (ckpt / "tokenizer.json").read_text() == (d / "tokenizer.json").read_text()


@pytest.fixture(scope="module")
def hf_text_dir(tmp_path_factory) -> Path:
    """The compiled tiny model with an HF tokenizer side instead of SentencePiece (tokenizer.json, chat template,
    runtime.json with eos_ids from copy_tokenizer_files)."""
    d = tmp_path_factory.mktemp("hftext") / "m"
    shutil.copytree(compiled_tiny_dir(), d)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    src = _hf_source(d.parent / "src")
    tf = copy_tokenizer_files(src, d, 256)
    rt = json.loads((d / "runtime.json").read_text())
    rt.update(tf.runtime_fields())
    (d / "runtime.json").write_text(json.dumps(rt))
    return d


def test_chat_template_renders_like_transformers(hf_text_dir):
    t = load_chat_template(hf_text_dir)
    msgs = [{"role": "user", "content": "hello"}]
    text = t.render(msgs)
    assert text == ("<|im_start|>system\nYou are a tiny model<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
                    "<|im_start|>assistant\n")
    try:  # the reference, where transformers is installed: same text
        from transformers.utils.chat_template_utils import render_jinja_template
        ref = render_jinja_template(conversations=[msgs], chat_template=TEMPLATE, add_generation_prompt=True)[0][0]
        assert ref == text
    except ImportError:
        pass
    g = Generator(hf_text_dir, provider="cpu", threads=1)
    ids = g.chat_ids(msgs)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> / <|im_end|> are single ids
    assert g.prompt_ids("hello") == [g.tokenizer.token_id("hello")]  # add_bos false: no BOS on a plain prompt


def test_chat_template_is_sandboxed_and_raise_exception_is_one_line():
    with pytest.raises(ChatError, match="refused the conversation: only user turns") as e:
        ChatTemplate("{{ raise_exception('only user turns') }}", "x.jinja").render([])
    assert "\n" not in str(e.value)
    with pytest.raises(ChatError, match="failed"):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", "x.jinja").render([])
    with pytest.raises(ChatError, match="does not parse"):
        ChatTemplate("{% for %}", "x.jinja")


def test_stop_strings_cut_and_hold_back():
    s = StopStrings(["<END>", "\n\n"])
    assert s.push("Paris is") == "Paris is"
    assert s.push(" nice <E") == " nice "  # "<E" may begin a stop string: held back
    assert s.push("ND> more") == "" and s.hit
    t = StopStrings(["<END>"])
    assert t.push("a <") == "a " and t.flush() == "<"
    assert StopStrings([]).push("x") == "x"


def test_stream_stops_at_every_end_token_and_at_stop_strings(hf_text_dir):
    g = Generator(hf_text_dir, provider="cpu", threads=1)
    ids = g.chat_ids([{"role": "user", "content": "hello"}])
    h = {}
    free = "".join(g.stream_ids(ids, max_new_tokens=12, stop_ids=[], result=h))
    toks = h["result"].tokens[0]
    assert g.stop_ids() == [2, 7, 0]
    h2 = {}
    list(g.stream_ids(ids, max_new_tokens=12, stop_ids=[toks[3]], result=h2))
    assert h2["result"].tokens[0] == toks[:toks.index(toks[3])] and h2["result"].stop_reasons == ["stop"]
    word = free.split()[1]
    h3 = {}
    cut = "".join(g.stream_ids(ids, max_new_tokens=12, stop_ids=[], stop_strings=[word], result=h3))
    assert cut == free[:free.index(word)] and h3["result"].stop_reasons == ["stop"]
    assert len(h3["result"].tokens[0]) < 12  # decoding ended at the stop string


def test_text_streamer_decodes_only_a_window_of_the_prompt():
    class Counting:
        def __init__(self):
            self.longest = 0

        def decode(self, ids):
            self.longest = max(self.longest, len(ids))
            return " ".join(map(str, ids))
    tok = Counting()
    st = TextStreamer(tok, list(range(1000)))
    assert st.push(5) == " 5" and tok.longest <= TextStreamer.CONTEXT + 1


def test_prompt_rules_read_old_runtime_json():
    class Tok:
        eos_id, bos_id = 2, 1
        sp = type("SP", (), {"id_to_piece": staticmethod(lambda i: f"<{i}>")})()
    r = PromptRules.from_runtime({"eos_id": 3, "bos_id": 1}, Tok())  # a runtime.json from before eos_ids
    assert r.eos_ids == [3] and r.add_bos and r.bos_id == 1
    r = PromptRules.from_runtime({"eos_ids": [3, 4], "bos_id": 1, "add_bos": False}, Tok())
    assert r.eos_ids == [3, 4] and not r.add_bos


def test_chat_history_keeps_turns_and_drops_the_oldest_to_fit():
    class FakeGen:
        model_dir, max_len = None, 64

        def __init__(self, d):
            self.model_dir, self.tokenizer, self.seen = d, HFTokenizer(d / "tokenizer.json"), []

        def stream_ids(self, ids, **kw):
            self.seen.append(ids)
            yield "Paris"
    d = Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"chat-{os.getpid()}"
    _hf_source(d)
    try:
        gen, out = FakeGen(d), []
        turns = run_chat(gen, lines=iter(["hello\n", "what is the capital of France ?\n", "/reset\n", "hello\n"]),
                         write=out.append, max_new_tokens=8)
        assert turns == 3 and "".join(out).count("Paris") == 3 and "[history cleared]" in "".join(out)
        second = gen.tokenizer.decode(gen.seen[1])
        assert "hello" in second and "Paris" in second and "France" in second  # the history is in turn 2's prompt
        assert "Paris" not in gen.tokenizer.decode(gen.seen[2])  # after /reset
        h = ChatHistory(load_chat_template(d), gen.tokenizer)
        for i in range(20):
            h.add("user", "hello " * 5)
            h.add("assistant", "Paris")
        ids = h.prompt_ids(40)
        assert len(ids) <= 40 and h.dropped > 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _cli(*args, python=sys.executable, stdin=None):
    return subprocess.run([python, "-m", "tapernorm.compiler.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300, input=stdin)


def test_generate_chat_and_chat_command(hf_text_dir):
    p = _cli("generate", str(hf_text_dir), "--chat", "--prompt", "hello", "--max-new-tokens", "6", "--threads", "1",
             "--provider", "cpu")
    assert p.returncode == 0, p.stderr
    assert "<|im_start|>" not in p.stdout and "hello" not in p.stdout.split("\n")[0][:5]  # only the reply
    reply = p.stdout.strip()
    c = _cli("chat", str(hf_text_dir), "--max-new-tokens", "6", "--threads", "1", stdin="hello\nhello\n")
    assert c.returncode == 0, c.stderr
    assert c.stdout.splitlines()[0].strip() == reply and "[2 turn(s)" in c.stderr
    nochat = compiled_tiny_dir()
    p = _cli("generate", str(nochat), "--chat", "--prompt", "hi")
    assert p.returncode == 2 and "has no chat template" in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(GENAI_PY is None, reason="no onnxruntime-genai venv (.venv-genai, README)")
def test_genai_engine_same_chat_text_and_context_stop(hf_text_dir):
    args = ["generate", str(hf_text_dir), "--chat", "--prompt", "hello", "--max-new-tokens", "6", "--threads", "1"]
    ours, theirs = _cli(*args, "--provider", "cpu"), _cli(*args, "--engine", "genai", python=GENAI_PY)
    assert ours.returncode == 0 and theirs.returncode == 0, theirs.stderr
    assert ours.stdout == theirs.stdout
    # default settings on the 64-token model: both engines stop at the context with the same text
    args = ["generate", str(compiled_tiny_dir()), "--prompt", "once upon a time", "--max-new-tokens", "100",
            "--threads", "1"]
    ours, theirs = _cli(*args, "--provider", "cpu"), _cli(*args, "--engine", "genai", python=GENAI_PY)
    assert theirs.returncode == 0, theirs.stderr
    assert ours.stdout == theirs.stdout and "stop: context" in ours.stderr and "stop: context" in theirs.stderr


def test_stop_ids_from_genai_config_without_runtime_json(hf_text_dir, tmp_path):
    """A directory written by onnxruntime-genai's own model builder has no runtime.json: genai_config's eos."""
    d = tmp_path / "m"
    shutil.copytree(hf_text_dir, d)
    (d / "runtime.json").unlink()
    conf = json.loads((d / "genai_config.json").read_text())
    conf["model"]["eos_token_id"] = [2, 7]
    (d / "genai_config.json").write_text(json.dumps(conf))
    g = Generator(d, provider="cpu", threads=1)
    assert g.stop_ids() == [2, 7] and not g.rules.add_bos
