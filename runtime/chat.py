"""Chat templates, the way transformers applies them, and `tapernorm chat DIR` (interactive, keeps the history).

A checkpoint's chat template is `chat_template.jinja` (current HF layout) or the "chat_template" key of
tokenizer_config.json (a string, or a list of {"name", "template"}: the "default" one). It is rendered like
transformers' apply_chat_template: jinja2's ImmutableSandboxedEnvironment with trim_blocks / lstrip_blocks,
`raise_exception`, `messages`, `add_generation_prompt`, `bos_token` / `eos_token` and the other special tokens
of tokenizer_config.json; the rendered text is encoded without adding BOS (the template writes what it wants).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

__all__ = ["ChatTemplate", "load_chat_template", "ChatHistory", "ChatError", "run_chat", "add_chat_cli"]

DEFAULT_CHAT_TOKENS = 256


class ChatError(ValueError):
    """A chat template is missing, broken, or raised (raise_exception) on the messages."""


class _TemplateRaise(Exception):
    pass


def _token_text(v) -> str | None:
    """A special token entry of tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


@dataclass
class ChatTemplate:
    """A compiled jinja2 chat template and the special-token variables it is rendered with."""
    source: str
    where: str
    variables: dict = field(default_factory=dict)

    def __post_init__(self):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise _TemplateRaise(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                     ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.source)
        except TemplateError as e:
            raise ChatError(f"{self.where}: the chat template does not parse ({e}); fix or remove it") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role", "content"}, ...])."""
        from jinja2 import TemplateError
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.variables)
        except _TemplateRaise as e:
            raise ChatError(f"{self.where}: the chat template refused the conversation: {e}") from None
        except TemplateError as e:
            raise ChatError(f"{self.where}: the chat template failed ({e})") from None


def load_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The directory's chat template (chat_template.jinja, else tokenizer_config.json's), None if it has none."""
    d = Path(model_dir)
    cfg_path = d / "tokenizer_config.json"
    cfg: dict = {}
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ChatError(f"{cfg_path} is not valid JSON ({e}); re-run `tapernorm compile`") from None
        cfg = cfg if isinstance(cfg, dict) else {}
    variables = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    if (d / "chat_template.jinja").is_file():
        return ChatTemplate((d / "chat_template.jinja").read_text(), str(d / "chat_template.jinja"), variables)
    t = cfg.get("chat_template")
    if isinstance(t, list):  # named templates: transformers uses "default"
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return ChatTemplate(t, f"{cfg_path} (chat_template)", variables) if isinstance(t, str) and t else None


def require_chat_template(model_dir: str | Path) -> ChatTemplate:
    """load_chat_template, or a one-line ChatError saying the directory has none."""
    t = load_chat_template(model_dir)
    if t is None:
        raise ChatError(f"{model_dir} has no chat template (chat_template.jinja or tokenizer_config.json's "
                        "chat_template); compile an instruct checkpoint that has one, or drop --chat")
    return t


class ChatHistory:
    """The conversation so far; `prompt_ids` renders it and drops the oldest turns that do not fit."""

    def __init__(self, template: ChatTemplate, tokenizer, system: str | None = None):
        self.template, self.tok = template, tokenizer
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.dropped = 0

    def prompt_ids(self, budget: int | None) -> list[int]:
        """Ids of the rendered conversation with the generation prompt, at most `budget` tokens (None: no limit)."""
        while True:
            ids = self.tok.encode(self.template.render(self.messages, add_generation_prompt=True))
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if budget is None or len(ids) <= budget or len(self.messages) - first <= 1:
                return ids
            del self.messages[first]  # the oldest turn goes first
            self.dropped += 1

    def add(self, role: str, content: str) -> None:
        """Append one message."""
        self.messages.append({"role": role, "content": content})


def run_chat(gen, *, lines, write: Callable[[str], None], max_new_tokens: int = DEFAULT_CHAT_TOKENS,
             system: str | None = None, stop: tuple = (), sampling=None, prompt_mark: str = "> ",
             interactive: bool = False) -> int:
    """The chat loop over a text generator (runtime.generate.Generator or the genai one): each line of
    `lines` is a user turn; the reply is streamed through `write`. Returns the number of turns."""
    hist = ChatHistory(require_chat_template(gen.model_dir), gen.tokenizer, system)
    turns = 0
    ctx = gen.max_len
    while True:
        if interactive:
            write(prompt_mark)
        line = next(lines, None)
        if line is None:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            hist = ChatHistory(hist.template, gen.tokenizer, system)
            write("[history cleared]\n")
            continue
        hist.add("user", line)
        dropped = hist.dropped
        ids = hist.prompt_ids(None if ctx is None else max(1, ctx - min(max_new_tokens, ctx // 2)))
        if hist.dropped > dropped:
            write(f"[dropped {hist.dropped - dropped} oldest message(s) to fit the {ctx}-token context]\n")
        reply = []
        for piece in gen.stream_ids(ids, max_new_tokens=max_new_tokens, sampling=sampling, stop_strings=stop):
            reply.append(piece)
            write(piece)
        write("\n")
        hist.add("assistant", "".join(reply))
        turns += 1
    return turns


def add_chat_cli(subparsers, handler, formatter, add_sampling_args) -> None:
    """Register `tapernorm chat DIR` (`handler(args)` runs it: runtime.generate_cli.cmd_chat; `add_sampling_args`
    adds the flags it shares with `generate`)."""
    p = subparsers.add_parser(
        "chat", formatter_class=formatter,
        help="chat with a compiled instruct model (its chat template, keeps the history)",
        description="Read user turns from stdin (one per line; /reset clears the history, /exit or EOF ends), "
                    "apply the checkpoint's chat template to the whole conversation and stream each reply. "
                    "The oldest turns are dropped when the conversation outgrows the context.")
    p.add_argument("model_dir", metavar="DIR", help="directory written by `tapernorm compile`")
    p.add_argument("--system", default=None, help="system message (default: the template's own)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_CHAT_TOKENS, help="reply length limit")
    p.add_argument("--engine", choices=("ort", "genai"), default="ort",
                   help="ort: tapernorm's decode loop; genai: onnxruntime-genai's (lean compile, own venv)")
    add_sampling_args(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.set_defaults(func=handler, provider="cpu", unfused=False, stop_token=[])


def stdin_lines():
    """Lines of stdin, read one at a time (works for a pipe and a terminal)."""
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        yield line
