"""Ollama `Modelfile` from a checkpoint's Jinja chat template: FROM, TEMPLATE (a Go template) and stop words.

Ollama cannot run Jinja, so the template is recognised as one of the known families and rewritten in
Ollama's Go template language (`.System`, `.Messages` with `.Role` / `.Content`, as the templates of
Ollama's own library models are written):
- ChatML (Qwen2.5, SmolLM2): <|im_start|>role\\n ... <|im_end|>\\n
- Llama 3: <|start_header_id|>role<|end_header_id|>\\n\\n ... <|eot_id|>
- Gemma: <start_of_turn>user|model\\n ... <end_of_turn>\\n (no system role: it opens the first user turn)
- Phi-3: <|system|>, <|user|>, <|assistant|> ... <|end|>\\n
A system prompt the template inserts when the conversation has none (SmolLM2, Qwen2.5, Llama 3.2) is found by
rendering the Jinja template (chat_template.py) and becomes the Go template's default. A template of
no known family, or no template at all, is an error: a guessed template would make Ollama prompt the
model in a format it was not tuned on. The BOS token is not written: llama.cpp adds it (add_bos_token).
"""
import dataclasses
import json

from .chat_template import compile_template
from .errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """How one family lays out a conversation: `{}` is where the content goes."""
    name: str
    marker: str  # a string only this family's templates contain
    system: str
    user: str
    assistant: str
    generation: str  # what opens the assistant's reply
    stops: tuple
    system_in_user: bool = False  # Gemma: the system text opens the first user turn

    def turn(self, role, content):
        return getattr(self, role).replace("{}", content)


CHAT_FORMATS = (
    ChatFormat("chatml", "<|im_start|>", "<|im_start|>system\n{}<|im_end|>\n", "<|im_start|>user\n{}<|im_end|>\n",
               "<|im_start|>assistant\n{}<|im_end|>\n", "<|im_start|>assistant\n", ("<|im_end|>",)),
    ChatFormat("llama3", "<|start_header_id|>", "<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
               "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n{}<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|eot_id|>", "<|start_header_id|>")),
    ChatFormat("gemma", "<start_of_turn>", "{}\n\n", "<start_of_turn>user\n{}<end_of_turn>\n",
               "<start_of_turn>model\n{}<end_of_turn>\n", "<start_of_turn>model\n", ("<end_of_turn>",),
               system_in_user=True),
    ChatFormat("phi3", "<|assistant|>", "<|system|>\n{}<|end|>\n", "<|user|>\n{}<|end|>\n",
               "<|assistant|>\n{}<|end|>\n", "<|assistant|>\n", ("<|end|>",)),
)


def detect_chat_format(template):
    """The ChatFormat whose marker the Jinja template contains, or CheckpointError."""
    for fmt in CHAT_FORMATS:
        if fmt.marker in template:
            return fmt
    raise CheckpointError("the chat template is of no family the Ollama export knows (ChatML, Llama 3, Gemma, "
                          f"Phi-3); write the Modelfile's TEMPLATE by hand. Template starts: {template[:120]!r}")


def render_jinja(template, messages, add_generation_prompt=True, special=None):
    """The checkpoint's template rendered as transformers' apply_chat_template does (chat_template.py's sandbox)."""
    special = special or {}
    return compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              bos_token=special.get("bos") or "", eos_token=special.get("eos") or "")


def default_system(template, fmt, special=None):
    """The system text the template inserts into a conversation that has none ("" if it inserts none)."""
    probe = "\x01probe\x01"  # rendered without BOS: llama.cpp adds it (and SmolLM2's BOS is <|im_start|>)
    text = render_jinja(template, [{"role": "user", "content": probe}], special={**(special or {}), "bos": ""})
    head = text[: text.index(fmt.turn("user", probe))] if fmt.turn("user", probe) in text else ""
    start, _, end = fmt.system.partition("{}")
    if head.startswith(start) and head.endswith(end) and len(head) >= len(start) + len(end) and not fmt.system_in_user:
        return head[len(start): len(head) - len(end)]
    return ""


def _go(text):
    """Literal text inside a Go template: only `{{` needs escaping."""
    return text.replace("{{", '{{"{{"}}')


def go_template(fmt, system_default=""):
    """Ollama's TEMPLATE for `fmt` (the layout of Ollama's library templates: .System, then .Messages)."""
    def part(role, content):
        before, _, after = getattr(fmt, role).partition("{}")
        return _go(before) + content + _go(after)

    fallback = f"{{{{ else }}}}{part('system', _go(system_default))}" if system_default else ""
    if fmt.system_in_user:  # the system text opens the first user turn
        user = (_go(fmt.user.partition("{}")[0]) + '{{ if and $.System (eq $i 0) }}' + part("system", "{{ $.System }}")
                + "{{ end }}{{ .Content }}" + _go(fmt.user.partition("{}")[2]))
        head = ""
    else:
        user = part("user", "{{ .Content }}")
        head = f"{{{{ if .System }}}}{part('system', '{{ .System }}')}{fallback}{{{{ end }}}}"
    before, _, after = fmt.assistant.partition("{}")
    return (head + "{{ range $i, $_ := .Messages }}"
            "{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            f'{{{{ if eq .Role "user" }}}}{user}'
            f'{{{{ else if eq .Role "assistant" }}}}{_go(before)}{{{{ .Content }}}}{{{{ if not $last }}}}{_go(after)}{{{{ end }}}}'
            "{{ end }}"
            f'{{{{ if and (ne .Role "assistant") $last }}}}{_go(fmt.generation)}{{{{ end }}}}'
            "{{ end }}")


def modelfile_text(template, gguf_name, special):
    """The Modelfile for `gguf_name` (beside it), or CheckpointError when the template cannot be translated."""
    if not template:
        raise CheckpointError("the checkpoint has no chat template (tokenizer_config.json chat_template or "
                              "chat_template.jinja), so Ollama would not know how to prompt it; use --format gguf "
                              "and write the Modelfile's TEMPLATE by hand.")
    fmt = detect_chat_format(template)
    system = default_system(template, fmt, special)
    stops = list(dict.fromkeys(list(fmt.stops) + [s for s in special.get("stop", []) if s]))
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(fmt, system)}"""']
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"
