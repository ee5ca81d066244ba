"""Chat templates against transformers: rendered ids, assistant masks, the sandbox, stop ids.

Reference: transformers' `AutoTokenizer.apply_chat_template` on the same files and messages. The masks are
checked against transformers' `return_assistant_tokens_mask`, which needs `{% generation %}` tags: the
reference renders a copy of the template with the assistant content and end-of-turn token wrapped in them,
while ours reads the plain template. Non-`real` tests use tests/data/chatml.jinja and a tokenizer trained
here; `real` tests use the instruct checkpoints' own templates (MINILORA_REAL_CKPTS).
"""
import json
import os

import pytest

from conftest import real_checkpoint
from minilora.chat_template import read_chat_template
from minilora.errors import TokenizerError
from minilora.tokenizer import load_tokenizer

TEMPLATE = os.path.join(os.path.dirname(__file__), "data", "chatml.jinja")
SPECIALS = ["<pad>", "<eos>", "<bos>", "<|im_start|>", "<|im_end|>"]
TEXT = ["def add(a, b):\n    return a + b\n", "Write a function that adds two numbers.", "print(x)", "hello there"]

SINGLE = [{"role": "user", "content": "Write a function that adds two numbers."},
          {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]
MULTI = [{"role": "system", "content": "Answer with code only."},
         {"role": "user", "content": "Add two numbers."}, {"role": "assistant", "content": "a + b"},
         {"role": "user", "content": "Now in a function,\nplease."},
         {"role": "assistant", "content": " def add(a, b):\n    return a + b\n"}]
CONVERSATIONS = {"single": SINGLE, "multi": MULTI}


def make_chat_tokenizer(directory, template=None, in_config=False, eos="<eos>"):
    """A byte-level BPE tokenizer with ChatML special tokens (ids 0-4) and tests/data/chatml.jinja."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 4, trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    template = template if template is not None else open(TEMPLATE).read()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": eos,
              "pad_token": "<pad>"}
    if in_config:
        config["chat_template"] = template
    else:
        with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
            f.write(template)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return directory


def generation_tagged(template):
    """The template with transformers' {% generation %} tags around each turn's content and end token, so
    transformers computes its own assistant mask (the reference for ours)."""
    plain = "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    assert plain in template
    tagged = ("{%- if message['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}{% generation %}"
              "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{%- else -%}" + plain + "{%- endif -%}")
    return template.replace(plain, tagged)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return make_chat_tokenizer(str(tmp_path_factory.mktemp("chat")))


def _hf_ids(hf, messages, add_generation_prompt):
    out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def check_against_transformers(directory, conversations, tagged_template=None):
    """Ids for every conversation with and without the generation prompt, and (with `tagged_template`) the
    assistant mask, equal to transformers'."""
    from transformers import AutoTokenizer

    tok, hf = load_tokenizer(directory), AutoTokenizer.from_pretrained(directory)
    for messages in conversations:
        assert tok.apply_chat_template(messages) == _hf_ids(hf, messages, False)
        prompt = messages[:-1]
        assert tok.apply_chat_template(prompt, add_generation_prompt=True) == _hf_ids(hf, prompt, True)
        assert tok.apply_chat_template(prompt) == _hf_ids(hf, prompt, False)
        ids, mask, _ = tok.chat_template.encode_with_mask(messages)
        assert ids == _hf_ids(hf, messages, False)
        if tagged_template is not None:
            ref = hf.apply_chat_template(messages, chat_template=tagged_template, return_dict=True,
                                         return_assistant_tokens_mask=True)
            assert list(ref["input_ids"]) == ids
            assert [bool(m) for m in ref["assistant_masks"]] == mask
    return tok


def check_mask_is_content_and_end_of_turn(tok, messages, strip=False):
    """The masked tokens, run by run, decode to exactly each assistant turn's content (stripped, for templates
    that trim it) and its end-of-turn token."""
    ids, mask, end_of_turn = tok.chat_template.encode_with_mask(messages)
    runs, current = [], None
    for t, m in zip(ids, mask):
        if m:
            current = (current or []) + [t]
        elif current is not None:
            runs.append(current)
            current = None
    runs += [current] if current else []
    turns = [m["content"].strip() if strip else m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(turns) == len(end_of_turn)
    for run, content, eot in zip(runs, turns, end_of_turn):
        assert run[-1] == eot and eot in tok.stop_ids
        assert tok.decode(run[:-1], skip_special_tokens=False) == content


@pytest.mark.parametrize("in_config", [False, True])
def test_ids_and_masks_match_transformers(tmp_path, in_config):
    directory = make_chat_tokenizer(str(tmp_path), in_config=in_config)
    tok = check_against_transformers(directory, [SINGLE, MULTI], generation_tagged(open(TEMPLATE).read()))
    for messages in (SINGLE, MULTI):
        check_mask_is_content_and_end_of_turn(tok, messages)


def test_a_template_that_trims_content_is_masked_on_the_trimmed_text(tmp_path):
    # Gemma's layout: BOS written by the template, the assistant role renamed, every content trimmed
    source = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
              "<|im_start|>{{ role }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>model\n{% endif %}")
    tok = check_against_transformers(make_chat_tokenizer(str(tmp_path), template=source), [SINGLE, MULTI])
    assert tok.apply_chat_template(SINGLE)[0] == tok.bos_id
    check_mask_is_content_and_end_of_turn(tok, MULTI, strip=True)


def test_end_of_turn_token_stops_generation_with_eos(chat_dir):
    tok = load_tokenizer(chat_dir)
    assert tok.stop_ids == sorted({tok.eos_id, tok.token_to_id("<|im_end|>")}) and len(tok.stop_ids) == 2


def test_template_file_wins_over_config_and_named_templates_are_read(tmp_path):
    directory = make_chat_tokenizer(str(tmp_path), template="from the file")
    config_path = os.path.join(directory, "tokenizer_config.json")
    config = json.load(open(config_path))
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "named"}]
    json.dump(config, open(config_path, "w"))
    assert read_chat_template(directory) == "from the file"
    os.remove(os.path.join(directory, "chat_template.jinja"))
    assert read_chat_template(directory) == "named"
    json.dump({"eos_token": "<eos>"}, open(config_path, "w"))
    assert read_chat_template(directory) is None
    with pytest.raises(TokenizerError, match="no chat template"):
        load_tokenizer(directory).apply_chat_template(SINGLE)


@pytest.mark.parametrize("source, message", [
    ("{{ messages.__class__.__mro__ }}", "sandbox"),
    ("{{ ''.__class__.__subclasses__() }}", "sandbox"),
    ("{% set ns = namespace() %}{% set ns._secret = 1 %}x", "sandbox"),
    ("{{ messages.append(1) }}", "sandbox"),
    ("{{ raise_exception('Only user and assistant roles are supported!') }}", "Only user and assistant roles"),
    ("{% for m in messages %}", "not a valid Jinja template"),
    ("{{ messages[0]['content'] + 1 }}", "rendering failed"),
])
def test_unsafe_or_failing_templates_are_refused(tmp_path, source, message):
    directory = make_chat_tokenizer(str(tmp_path), template=source)
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(directory).apply_chat_template(SINGLE)


def test_helpers_have_transformers_semantics(tmp_path):
    from transformers import AutoTokenizer

    source = ("{{ messages[0]['content'] | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2, sort_keys=True) }}|"
              "{{ strftime_now('%Y') }}|{{ dict(x=1)['x'] }}|{{ bos_token }}{{ eos_token }}|"
              "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['role'] }}{% endfor %}")
    directory = make_chat_tokenizer(str(tmp_path), template=source)
    messages = [{"role": "user", "content": "<a href='x'>é & \"q\"</a>"}, {"role": "assistant", "content": "ok"}]
    ours = load_tokenizer(directory).chat_template.render(messages)
    assert ours == AutoTokenizer.from_pretrained(directory).apply_chat_template(messages, tokenize=False)
    assert "<a href='x'>é" in ours  # not HTML-escaped, not ASCII-escaped


def test_a_template_that_rewrites_earlier_turns_has_no_mask(tmp_path):
    source = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>old<|im_end|>"
              "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = load_tokenizer(make_chat_tokenizer(str(tmp_path), template=source))
    tok.chat_template.encode_with_mask(SINGLE)  # one turn: fine
    with pytest.raises(TokenizerError, match="changes once the turn is added"):
        tok.chat_template.encode_with_mask(MULTI)


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
def test_real_templates_match_transformers(name):
    directory = real_checkpoint(name)
    tok = check_against_transformers(directory, [SINGLE, MULTI, MULTI[1:]])
    for messages in (SINGLE, MULTI, MULTI[1:]):
        check_mask_is_content_and_end_of_turn(tok, messages)
    assert tok.token_to_id("<|im_end|>") in tok.stop_ids
