"""The tokenizer: a `tokenizers.Tokenizer` read from `tokenizer.json`, plus the special ids and the chat template.

bos/eos/pad ids come from `tokenizer_config.json` (token strings, or `added_tokens_decoder`) and
`generation_config.json` (`eos_token_id`, possibly a list: every id in it stops generation), falling back
to `config.json`. Matches what transformers' `AutoTokenizer` does for the fast tokenizers of our models.
The checkpoint's chat template (minilora/chat_template.py) gives `apply_chat_template`, and its end-of-turn
token joins the stop ids: an instruct model's turn ends there, whichever format prompted it.
"""
import json
import os

import tokenizers

from .chat_template import SPECIAL_TOKEN_NAMES, ChatTemplate, read_chat_template
from .config import MAX_CONFIG_BYTES
from .errors import TokenizerError


class Tokenizer:
    """`encode(text) -> list[int]` and `decode(ids) -> str`, with the model's special ids."""

    def __init__(self, tokenizer, bos_id, eos_id, pad_id, stop_ids=None, chat_template=None):
        self._tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        # No pad token (Llama 3.2, Qwen2.5 base): pad with eos, which labels and masks hide anyway.
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.chat_template = chat_template  # a ChatTemplate, or None when the checkpoint ships none
        end_of_turn = chat_template.end_of_turn_ids if chat_template is not None else ()
        self.stop_ids = sorted(set(stop_ids or []) | {eos_id} | set(end_of_turn))

    def apply_chat_template(self, messages, add_generation_prompt=False):
        """Token ids of `messages` (a list of {"role", "content"}) rendered with the checkpoint's chat template,
        as transformers' `tokenizer.apply_chat_template(messages, add_generation_prompt=...)` returns them."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template (no chat_template.jinja, no chat_template in "
                                 "tokenizer_config.json): use the Alpaca prompt format (--prompt-format alpaca).")
        return self.chat_template.encode(messages, add_generation_prompt)

    @property
    def vocab_size(self):
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text, add_special_tokens=False):
        """Token ids of `text`; with add_special_tokens the tokenizer's post-processor adds BOS where the model uses one."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts, add_special_tokens=False):
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens=True):
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self._tokenizer.token_to_id(token)

    def save(self, directory):
        """Write tokenizer.json and a minimal tokenizer_config.json naming the special tokens."""
        os.makedirs(directory, exist_ok=True)
        self._tokenizer.save(os.path.join(directory, "tokenizer.json"))
        names = {k: self._tokenizer.id_to_token(v) for k, v in
                 (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)) if v is not None}
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(names, f, indent=2)
        if self.chat_template is not None:
            with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(self.chat_template.source)


def _read_json(path):
    if not os.path.isfile(path):
        return {}
    if os.path.getsize(path) > MAX_CONFIG_BYTES:  # docs/reliability.md F3: bound what we parse
        raise TokenizerError(f"{path}: {os.path.getsize(path)} bytes is too large for this file (limit "
                             f"{MAX_CONFIG_BYTES}). Re-download it.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5,000-digit int, nesting past Python's stack
        raise TokenizerError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]}). Re-download or fix "
                             "the file.") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}.")
    return data


def _token_id(tokenizer, value, source):
    """A special token given as a string, an AddedToken dict, or an id."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise TokenizerError(f"{source}: special token {value!r} is neither a string nor an id.")
    token_id = tokenizer.token_to_id(value)
    if token_id is None:
        raise TokenizerError(f"{source}: special token {value!r} is not in tokenizer.json's vocabulary.")
    return token_id


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_tokenizer(directory):
    """Read `directory/tokenizer.json` and the special ids from the json files beside it."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        extra = " (a sentencepiece tokenizer.model alone is not supported: convert it with transformers' "
        extra += "AutoTokenizer(...).save_pretrained(DIR), which writes tokenizer.json)"
        raise TokenizerError(f"{path} is missing{extra if os.path.exists(os.path.join(directory, 'tokenizer.model')) else ''}.")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises bare Exceptions on malformed files
        raise TokenizerError(f"{path}: cannot be read by `tokenizers` ({e}). Re-download the file.") from None
    tok_cfg_path = os.path.join(directory, "tokenizer_config.json")
    gen_cfg_path = os.path.join(directory, "generation_config.json")
    model_cfg_path = os.path.join(directory, "config.json")
    tok_cfg, gen_cfg, model_cfg = _read_json(tok_cfg_path), _read_json(gen_cfg_path), _read_json(model_cfg_path)

    def pick(key):  # tokenizer_config's token strings first, then ids from generation_config / config
        value = _token_id(tokenizer, tok_cfg.get(key.replace("_id", "")), tok_cfg_path)
        for cfg, src in ((gen_cfg, gen_cfg_path), (model_cfg, model_cfg_path)):
            if value is None and cfg.get(key) is not None:
                ids = _as_list(cfg[key])
                value = ids[0] if ids else None
        return value

    bos_id, pad_id = pick("bos_token_id"), pick("pad_token_id")
    eos_id = pick("eos_token_id")
    stop_ids = _as_list(gen_cfg.get("eos_token_id")) or _as_list(model_cfg.get("eos_token_id"))
    if eos_id is None:
        if not stop_ids:
            raise TokenizerError(f"{directory}: no eos token in tokenizer_config.json, generation_config.json "
                                 "or config.json; add `eos_token` to tokenizer_config.json.")
        eos_id = stop_ids[0]
    for name, value in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id), *(("stop", s) for s in stop_ids)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value < tokenizer.get_vocab_size(with_added_tokens=True)):
            raise TokenizerError(f"{directory}: {name} id {value!r} is not a token id of the vocabulary "
                                 f"(size {tokenizer.get_vocab_size(with_added_tokens=True)}).")
    template = read_chat_template(directory)
    if template is not None:
        strings = {**_read_json(os.path.join(directory, "special_tokens_map.json")), **tok_cfg}
        special = {name: _token_text(strings.get(name)) for name in SPECIAL_TOKEN_NAMES}
        template = ChatTemplate(template, tokenizer, special, where=f"{directory}: chat template")
    return Tokenizer(tokenizer, bos_id, eos_id, pad_id, stop_ids, template)


def _token_text(value):
    """A special token's text from a string or an AddedToken dict (template variables are strings)."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None
