"""Data formats (Alpaca, chat messages, prompt/completion), chat-format labels, and generation that stops at the
chat template's end-of-turn token.

Labels are checked against transformers' assistant mask (tests/test_chat_template.py's tagged template);
generation with the end-of-turn stop id against the same model's generation without it, cut by hand.
"""
import json
import os

import pytest
import torch

from minilora import data, formats
from minilora.errors import ConfigError, DataError
from minilora.tokenizer import load_tokenizer
from test_chat_template import MULTI, SINGLE, TEMPLATE, generation_tagged, make_chat_tokenizer

ALPACA = [{"instruction": f"Add {i} to x.", "input": "" if i % 2 else "x = 1", "output": f"x + {i}"} for i in range(6)]
CHAT = [{"messages": SINGLE}, {"messages": MULTI}]
PC = [{"prompt": "Add two numbers: ", "completion": "a + b"}]


def write(path, rows, jsonl=True):
    path.write_text("\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows))
    return str(path)


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    return load_tokenizer(make_chat_tokenizer(str(tmp_path_factory.mktemp("tok"))))


# ------------------------------------------------------------------------------------------ formats

@pytest.mark.parametrize("rows, expected", [(ALPACA, "alpaca"), (CHAT, "chat"), (PC, "prompt_completion")])
@pytest.mark.parametrize("jsonl", [True, False])
def test_formats_are_detected_from_the_keys(tmp_path, rows, expected, jsonl):
    counts = {}
    records = data.load_records(write(tmp_path / "d.json", rows, jsonl), counts=counts)
    assert counts["data_format"] == expected and len(records) == len(rows)
    assert [formats.answer(r) for r in records] == [formats.answer(formats.normalize(r, expected)) for r in rows]


def test_format_can_be_named_and_then_rows_must_follow_it(tmp_path):
    path = write(tmp_path / "d.jsonl", ALPACA)
    with pytest.raises(DataError, match="line 1: missing key 'messages'"):
        data.load_records(path, data_format="chat")
    with pytest.raises(ConfigError, match="--data-format"):
        data.load_records(path, data_format="sharegpt")


def test_conversational_prompt_completion_becomes_messages(tmp_path):
    row = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}
    [record] = data.load_records(write(tmp_path / "d.jsonl", [row]))
    assert record == {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.mark.parametrize("messages, why", [
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "unknown role 'tool'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message at index 1"),
    ([{"role": "assistant", "content": "a"}], "'assistant' where 'user' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "'user' where 'assistant' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}], "content is int (3)"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}], "empty assistant message"),
    ([{"role": "user", "content": "a"}], "last message must be the assistant's"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([], "non-empty list"),
])
def test_bad_chat_rows_name_file_line_and_rule(tmp_path, messages, why):
    path = write(tmp_path / "chat.jsonl", CHAT + [{"messages": messages}])
    with pytest.raises(DataError) as e:
        data.load_records(path)
    assert "chat.jsonl" in str(e.value) and "line 3" in str(e.value) and why in str(e.value)
    counts = {}
    assert len(data.load_records(path, skip_bad_rows=True, counts=counts)) == 2 and counts["bad_rows_skipped"] == 1


def test_chat_dataset_from_the_hub(monkeypatch, tmp_path):
    import huggingface_hub

    path = write(tmp_path / "train.jsonl", CHAT)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, repo_type: ["README.md", "train.jsonl"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, repo_type: path)
    assert data.load_records("someone/chat-data") == [{"messages": SINGLE}, {"messages": MULTI}]


def test_prompt_format_resolution():
    assert formats.resolve_prompt_format("auto", True, "chat") == "chat"
    assert formats.resolve_prompt_format("auto", True, "alpaca") == "alpaca"
    assert formats.resolve_prompt_format("auto", False, "chat") == "alpaca"
    assert formats.resolve_prompt_format("alpaca", True, "chat") == "alpaca"
    with pytest.raises(ConfigError, match="no chat template"):
        formats.resolve_prompt_format("chat", False, "alpaca")


def test_alpaca_record_in_chat_format_and_chat_record_in_alpaca_format():
    assert formats.to_messages(ALPACA[0]) == [{"role": "user", "content": "Add 0 to x.\n\nx = 1"},
                                              {"role": "assistant", "content": "x + 0"}]
    assert formats.to_messages(ALPACA[1])[0]["content"] == "Add 1 to x."
    assert formats.alpaca_prompt({"messages": SINGLE}) == formats.format_prompt(
        {"instruction": SINGLE[0]["content"], "input": ""})
    with pytest.raises(DataError, match="2 exchanges"):
        formats.alpaca_prompt({"messages": MULTI})


# ------------------------------------------------------------------------------------- chat labels

def test_chat_labels_are_transformers_assistant_mask(chat_tok, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(make_chat_tokenizer(str(tmp_path)))
    tagged = generation_tagged(open(TEMPLATE).read())
    for record in [{"messages": SINGLE}, {"messages": MULTI}, ALPACA[0], PC[0]]:
        ex = data.tokenize_example(record, chat_tok, 512, prompt_format="chat")
        ref = hf.apply_chat_template(formats.to_messages(record), chat_template=tagged, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert ex.input_ids == list(ref["input_ids"])
        assert ex.labels == [t if m else data.IGNORE_INDEX for t, m in zip(ref["input_ids"], ref["assistant_masks"])]


def test_chat_truncation_ends_the_turn_and_drops_rows_without_answer(chat_tok):
    ex = data.tokenize_example({"messages": MULTI}, chat_tok, 512, prompt_format="chat")
    last = max(i for i, label in enumerate(ex.labels) if label != data.IGNORE_INDEX)
    eot = chat_tok.token_to_id("<|im_end|>")
    stats = data.TokenizeStats()
    cut = data.tokenize_example({"messages": MULTI}, chat_tok, last - 2, stats=stats, prompt_format="chat")
    assert len(cut.input_ids) == last - 2 and cut.input_ids[-1] == eot and cut.labels[-1] == eot
    assert cut.input_ids[:-1] == ex.input_ids[:last - 3] and stats.truncated == 1
    first = min(i for i, label in enumerate(ex.labels) if label != data.IGNORE_INDEX)
    assert data.tokenize_example({"messages": MULTI}, chat_tok, first, stats=stats, prompt_format="chat") is None
    assert data.tokenize_example({"messages": MULTI}, chat_tok, last - 2, "drop", stats, "chat") is None
    assert stats.dropped_long == 2


def test_multi_turn_chat_in_alpaca_format_names_the_record(chat_tok):
    with pytest.raises(DataError, match="record 1: .*--prompt-format chat"):
        data.tokenize_records([{"messages": SINGLE}, {"messages": MULTI}], chat_tok, 512, prompt_format="alpaca")


# --------------------------------------------------------------------------------------- generation

def stopping_model(directory, device):
    """A tiny Llama with the chat tokenizer, whose head makes <|im_end|> the greedy choice wherever the token
    first generated at step `k` >= 2 would be: (model, tokenizer, prompt ids, unstopped ids, k)."""
    from minilora.generate import generate
    from minilora.loading import load_model
    from tiny import make_checkpoint

    make_checkpoint("llama", directory, seed=3, tie_word_embeddings=False)
    make_chat_tokenizer(directory)
    model, tok = load_model(directory, device=device)
    prompt = tok.apply_chat_template(SINGLE[:1], add_generation_prompt=True)
    free = generate(model, [prompt], 12, stop_ids=(), use_graph=False)[0]
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i] and free[i] > 4)
    eot = tok.token_to_id("<|im_end|>")
    with torch.no_grad():  # ties go to the lower id, so <|im_end|> (4) wins where free[k] would
        model.lm_head.weight[eot] = model.lm_head.weight[free[k]]
    unstopped = generate(model, [prompt], 12, stop_ids=(), use_graph=False)[0]
    assert unstopped[:k] == free[:k] and unstopped[k] == eot
    return model, tok, prompt, unstopped, k


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_generation_stops_at_the_end_of_turn_token_on_cpu(tmp_path, temperature):
    from minilora.generate import generate, generate_text

    model, tok, prompt, unstopped, k = stopping_model(str(tmp_path), "cpu")
    assert tok.eos_id != tok.token_to_id("<|im_end|>") and tok.token_to_id("<|im_end|>") in tok.stop_ids
    if temperature == 0.0:
        assert generate(model, [prompt], 12, stop_ids=tok.stop_ids)[0] == unstopped[:k]
        stats = {}
        text = generate_text(model, tok, [prompt, "plain text prompt"], 12, stats=stats)
        assert text[0] == tok.decode(unstopped[:k])
    else:  # the sampling branch: same draws with and without the stop, cut at the end-of-turn token
        sampled = generate(model, [prompt], 12, temperature=temperature, stop_ids=(),
                           generator=torch.Generator().manual_seed(0))[0]
        stopped = generate(model, [prompt], 12, temperature=temperature, stop_ids=tok.stop_ids,
                           generator=torch.Generator().manual_seed(0))[0]
        eot = tok.token_to_id("<|im_end|>")
        assert stopped == sampled[:sampled.index(eot)] if eot in sampled else stopped == sampled


@pytest.mark.gpu
def test_generation_stops_at_the_end_of_turn_token_on_gpu(tmp_path, device):
    from minilora.generate import generate

    model, tok, prompt, unstopped, k = stopping_model(str(tmp_path), device)
    for use_graph in (False, True):  # eager and the graphed greedy decoder with its stop-id buffer
        assert generate(model, [prompt], 12, stop_ids=tok.stop_ids, use_graph=use_graph)[0] == unstopped[:k]
        assert generate(model, [prompt, prompt[2:]], 12, stop_ids=tok.stop_ids, use_graph=use_graph)[0] == unstopped[:k]


# ------------------------------------------------------------------------------------ train, evaluate

def test_train_and_evaluate_chat_data_in_the_chat_format(tmp_path, capsys):
    """train.py on messages JSONL trains in the chat format (auto) and records it; evaluate.py with the
    adapter scores in that format, and its predictions equal peft + transformers' greedy generate on
    transformers' own `apply_chat_template(..., add_generation_prompt=True)` ids."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    import evaluate
    import train
    from tiny import make_checkpoint

    base = str(tmp_path / "base")
    hf = make_checkpoint("llama", base, seed=5)
    make_chat_tokenizer(base)
    rows = [{"messages": [{"role": "user", "content": f"Add {i} to x."},
                          {"role": "assistant", "content": f"x + {i}"}]} for i in range(16)]
    data_file = write(tmp_path / "chat.jsonl", rows)
    run = tmp_path / "run"
    assert train.main(["--model", base, "--data", data_file, "--out", str(run), "--quantize", "none", "--max-steps",
                       "3", "--micro-batch-size", "2", "--grad-accum-steps", "1", "--lora-r", "4",
                       "--test-fraction", "0.25", "--no-progress", "--no-gradient-checkpointing", "--save-every", "0",
                       "--eval-every", "0", "--device", "cpu"]) == 0
    recorded = json.loads((run / "train_config.json").read_text())
    assert (recorded["data_format"], recorded["prompt_format"]) == ("chat", "chat")
    out = tmp_path / "eval"
    assert evaluate.main(["--model", base, "--adapter", str(run / "adapter"), "--out", str(out), "--quantize", "none",
                          "--max-new-tokens", "6", "--no-progress", "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert summary["prompt_format"] == "chat" and summary["n"] == 4

    _, test = data.split_records(data.load_records(data_file), test_fraction=0.25, seed=0)
    hf_tok, tok = AutoTokenizer.from_pretrained(base), load_tokenizer(base)
    peft_model = PeftModel.from_pretrained(hf, str(run / "adapter")).eval()
    for record, row in zip(test, predictions):
        ids = hf_tok.apply_chat_template(record["messages"][:-1], add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        with torch.no_grad():
            new = peft_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                                      eos_token_id=tok.stop_ids)[0, len(ids):].tolist()
        new = new[:next((i for i, t in enumerate(new) if t in tok.stop_ids), len(new))]
        assert row["prediction"] == tok.decode(new).strip() and row["messages"] == record["messages"][:-1]
