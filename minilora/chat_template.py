"""Chat templates: the checkpoint's Jinja template rendered as transformers renders it, and the assistant mask.

Reference: transformers' `PreTrainedTokenizerBase.apply_chat_template` and `utils/chat_template_utils.py`
(`_compile_jinja_template`, `render_jinja_template`). The template is compiled in jinja2's
`ImmutableSandboxedEnvironment`, because it comes from a downloaded file: no access to Python internals, no
mutation of the objects passed in. Like transformers: `trim_blocks` and `lstrip_blocks`, the loop-controls
extension, its `tojson` (plain `json.dumps`, no HTML escaping), `raise_exception`, `strftime_now`, `dict` and
a `namespace` that refuses underscore names; the tokenizer's special tokens (`bos_token`, `eos_token`, ...)
are template variables; the rendered text is encoded with no special tokens added (the template writes
them). tests/test_chat_template.py compares our ids with transformers' on the same messages.

The assistant mask (which tokens the loss covers) is found in the rendered text, for every assistant turn i:
render messages[:i] with the generation prompt; that text must be a prefix of the whole conversation's text
and be followed by the assistant's content (as written, or stripped, as some templates trim it) and then by
one added token, the end-of-turn token. The span content + end-of-turn token is supervised; every token
overlapping it is masked in. A template for which this does not hold is refused with a TokenizerError rather
than trained with a wrong mask.
"""
import datetime
import json
import os

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TokenizerError

ROLES = ("system", "user", "assistant")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
MAX_TEMPLATE_BYTES = 1 << 20  # real templates are a few KB; bound what we compile


def read_chat_template(directory):
    """The checkpoint's chat template text, or None.

    `chat_template.jinja` first (transformers v5 saves templates there, and it wins over the config entry),
    then tokenizer_config.json's `chat_template`: a string, or a list of named templates (the "default" one).
    """
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(path):
        if os.path.getsize(path) > MAX_TEMPLATE_BYTES:
            raise TokenizerError(f"{path}: {os.path.getsize(path)} bytes is too large for a chat template.")
        with open(path, encoding="utf-8") as f:
            return f.read()
    config_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            value = json.load(f).get("chat_template")
    except (ValueError, RecursionError, AttributeError) as e:
        raise TokenizerError(f"{config_path}: not a JSON object ({type(e).__name__}).") from None
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{config_path}: chat_template is {type(value).__name__}, expected a string.")
    return value


class _Namespace(jinja2.utils.Namespace):
    """transformers' TemplateNamespace: a namespace that refuses underscore-prefixed names."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace.")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers replaces jinja's tojson, which escapes HTML characters and takes fewer options
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.datetime.now().strftime(format)


def compile_template(source, where="chat template"):
    """A jinja2 Template compiled in the sandbox described in the module docstring."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=dict, namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{where}: not a valid Jinja template (line {e.lineno}: {e.message}).") from None


class ChatTemplate:
    """A compiled chat template with the tokenizer it renders for (a `tokenizers.Tokenizer`)."""

    def __init__(self, source, tokenizer, special_tokens, where="chat template"):
        self.source, self.where = source, where
        self._template = compile_template(source, where)
        self._tokenizer = tokenizer
        self._variables = {k: v for k, v in special_tokens.items() if v is not None}
        # longest first, so "<|im_end|>" is matched before a shorter added token it starts with
        self._added = sorted(((t.content, i) for i, t in tokenizer.get_added_tokens_decoder().items()),
                             key=lambda x: -len(x[0]))
        self._end_of_turn = None

    def render(self, messages, add_generation_prompt=False):
        """The conversation's text, as transformers' `apply_chat_template(..., tokenize=False)` gives it."""
        try:
            return self._template.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self._variables)
        except jinja2.exceptions.SecurityError as e:
            raise TokenizerError(f"{self.where}: refused by the sandbox ({e}).") from None
        except Exception as e:  # a downloaded template can fail in any way: name the template, never crash
            raise TokenizerError(f"{self.where}: rendering failed ({type(e).__name__}: {e}).") from None

    def encode(self, messages, add_generation_prompt=False):
        """Token ids of the rendered conversation (no special tokens added: the template writes them)."""
        return self._tokenizer.encode(self.render(messages, add_generation_prompt), add_special_tokens=False).ids

    def _added_token_at(self, text, position):
        """(content, id) of the added token that starts at `text[position]`, or None."""
        return next(((c, i) for c, i in self._added if text.startswith(c, position)), None)

    def assistant_spans(self, messages):
        """(text, [(start, end, end_of_turn_id)]): the whole conversation and, per assistant turn, the character
        span of its content and end-of-turn token (module docstring). TokenizerError where the template does not
        allow a mask."""
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            if not text.startswith(prefix):
                raise TokenizerError(f"{self.where}: the text before assistant turn {i} changes once the turn is "
                                     "added (the template rewrites earlier turns), so its loss mask cannot be found.")
            content = message["content"]
            start = len(prefix)
            if not text.startswith(content, start):
                content = content.strip()
                start += len(text[start:]) - len(text[start:].lstrip())  # a template that trims the content
                if not text.startswith(content, start):
                    raise TokenizerError(f"{self.where}: assistant turn {i}'s content does not follow the generation "
                                         "prompt in the rendered text, so its loss mask cannot be found.")
            end = start + len(content)
            token = self._added_token_at(text, end)
            if token is None:
                raise TokenizerError(f"{self.where}: no special token ends assistant turn {i} (found "
                                     f"{text[end:end + 20]!r}), so a tuned model could not learn where to stop.")
            spans.append((start, end + len(token[0]), token[1]))
        return text, spans

    def encode_with_mask(self, messages):
        """(ids, mask, end_of_turn_ids): the rendered conversation's ids; per id, True where the loss covers it
        (every token overlapping an assistant span); the end-of-turn id of each assistant turn."""
        text, spans = self.assistant_spans(messages)
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        mask, k = [], 0
        for start, end in encoding.offsets:  # both in order: one pass, as transformers' assistant mask
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            mask.append(k < len(spans) and end > spans[k][0] and end > start)
        return encoding.ids, mask, [eot for _, _, eot in spans]

    @property
    def end_of_turn_ids(self):
        """Ids of the token(s) that end an assistant turn in this template (for stopping generation); () if the
        template cannot render a plain user/assistant exchange."""
        if self._end_of_turn is None:
            probe = [{"role": "user", "content": "Say x."}, {"role": "assistant", "content": "x"}]
            try:
                self._end_of_turn = tuple(sorted({eot for _, _, eot in self.assistant_spans(probe)[1]}))
            except TokenizerError:
                self._end_of_turn = ()
        return self._end_of_turn
