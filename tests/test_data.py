"""minilora.data: reading CodeAlpaca files, the exact Alpaca prompt, answer-only labels, split, packing, resume order."""
import json
import os
import re

import pytest
import torch
from conftest import REFERENCE_DIR, codealpaca_2k
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from minilora import data
from minilora.errors import ConfigError, DataError, HubError
from minilora.tokenizer import Tokenizer

PAD, EOS, BOS = 0, 1, 2

# docs/reference/README.md §3.1, typed out again here by hand.
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nSum {a} and b.\n\n### Response:")
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nSort it.\n\n"
              "### Input:\n[3, 1]\n\n### Response:")


@pytest.fixture(scope="module")
def tok():
    """A real byte-level BPE (BOS added by the post-processor, like Llama 3) behind minilora's Tokenizer."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(["def add(a, b):\n    return a + b", NO_INPUT, WITH_INPUT] * 3, trainer)
    hf.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return Tokenizer(hf, BOS, EOS, PAD)


def write(path, text, mode="w"):
    with open(path, mode) as f:
        f.write(text)
    return str(path)


def rec(instruction="Sum a and b.", input="", output="a + b"):
    return {"instruction": instruction, "input": input, "output": output}


# ----------------------------------------------------------------------------------------- prompt

def test_prompt_templates_exact_text():
    assert data.format_prompt(rec("Sum {a} and b.")) == NO_INPUT  # braces in the instruction stay literal
    assert data.format_prompt(rec("Sort it.", "[3, 1]")) == WITH_INPUT


def test_prompt_templates_match_reference_readme():
    path = os.path.join(REFERENCE_DIR, "README.md")
    section = open(path, encoding="utf-8").read().split("### 3.1", 1)[1].split("### 3.2", 1)[0]
    blocks = [b.strip("\n").replace("\\n", "\n") for b in re.findall(r"```\n(.*?)```", section, re.S)]
    with_input, no_input = blocks[:2]
    assert data.format_prompt(rec("I", "X")) == with_input.format(instruction="I", input="X")
    assert data.format_prompt(rec("I")) == no_input.format(instruction="I")


# ----------------------------------------------------------------------------------------- reading

def test_json_list_and_jsonl_read_the_same(tmp_path):
    rows = [rec("a", "", "x"), rec("b", "in", "y\nz"), {**rec("c"), "extra": 1}]
    a = data.load_records(write(tmp_path / "a.json", json.dumps(rows, indent=4)))
    b = data.load_records(write(tmp_path / "b.json", "\n".join(json.dumps(r) for r in rows) + "\n\n"))
    assert a == b == [rec("a", "", "x"), rec("b", "in", "y\nz"), rec("c")]


def test_bom_is_stripped(tmp_path):
    path = write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + json.dumps(rec()).encode() + b"\n", "wb")
    assert data.load_records(path) == [rec()]


def test_non_utf8_names_the_line(tmp_path):
    body = (json.dumps(rec()) + "\n").encode() * 2 + b'{"instruction": "\xff"}\n'
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not UTF-8"):
        data.load_records(write(tmp_path / "bad.jsonl", body, "wb"))


def test_bad_rows_are_listed_with_their_place(tmp_path):
    lines = [json.dumps(rec())] * 6 + ['{"instruction": "x", "input": ""', json.dumps({"instruction": "x", "input": ""}),
                                       json.dumps(rec(output=3)), json.dumps([1, 2])]
    path = write(tmp_path / "rows.jsonl", "\n".join(lines))
    with pytest.raises(DataError) as e:
        data.load_records(path)
    msg = str(e.value)
    assert "4 of 10 rows are bad" in msg and "rows.jsonl" in msg and "--skip-bad-rows" in msg
    assert "line 7: invalid JSON" in msg and "line 8: missing key 'output'" in msg
    assert "line 9: 'output' is int" in msg and "line 10: expected an object" in msg
    assert data.load_records(path, skip_bad_rows=True) == [rec()] * 6


def test_bad_rows_in_json_list_use_list_index(tmp_path):
    rows = [rec(), rec(input=None), rec()] + [{"output": "x"}] * 6
    with pytest.raises(DataError) as e:
        data.load_records(write(tmp_path / "l.json", json.dumps(rows)))
    assert "row 1: 'input' is NoneType" in str(e.value) and "row 3: missing key 'instruction'" in str(e.value)
    assert "7 of 9 rows are bad" in str(e.value) and str(e.value).count("missing key") == 4  # first 5 listed


def test_invalid_json_document_gives_line_and_column(tmp_path):
    with pytest.raises(DataError, match=r"d\.json:3:1: invalid JSON"):
        data.load_records(write(tmp_path / "d.json", '[\n{"a": 1}\n}'))


@pytest.mark.parametrize("body", ["", "\n\n  \n", json.dumps([rec(output=1)])])
def test_zero_usable_rows(tmp_path, body):
    with pytest.raises(DataError, match="0 usable rows"):
        data.load_records(write(tmp_path / "e.json", body), skip_bad_rows=True)


def test_single_object_file_is_explained(tmp_path):
    with pytest.raises(DataError, match="found one JSON object with keys"):
        data.load_records(write(tmp_path / "o.json", json.dumps({"data": [rec()]}, indent=2)))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file.*--data FILE"):
        data.load_records(str(tmp_path / "nope.json"))


def test_hub_offline_says_pass_data_file(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("network unreachable")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(HubError, match=r"sahil2801/CodeAlpaca-20k.*network unreachable.*--data FILE"):
        data.load_records(data.HUB_DATASET)


def test_hub_download_is_read(monkeypatch, tmp_path):
    import huggingface_hub

    path = write(tmp_path / "code_alpaca_20k.json", json.dumps([rec("hub")]))
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append((a, k)) or path)
    assert data.load_records(data.HUB_DATASET) == [rec("hub")]
    assert calls == [((data.HUB_DATASET, "code_alpaca_20k.json"), {"repo_type": "dataset"})]


@pytest.mark.codealpaca
def test_real_2k_sample():
    records = data.load_records(codealpaca_2k())
    assert len(records) == 2017 and sum(r["input"] == "" for r in records) == 1011
    assert [i for i, r in enumerate(records) if r["output"] == ""] == [237, 1859]


# ----------------------------------------------------------------------------------------- tokens

def test_labels_mask_the_prompt_and_end_in_eos(tok):
    r = rec("Sort it.", "[3, 1]", "sorted(x)")
    ex = data.tokenize_example(r, tok, max_len=512)
    prompt = tok.encode(WITH_INPUT, add_special_tokens=True)
    answer = tok.encode("sorted(x)") + [EOS]
    assert prompt[0] == BOS and ex.input_ids.count(BOS) == 1
    assert ex.input_ids == prompt + answer
    assert ex.labels == [-100] * len(prompt) + answer and ex.labels[-1] == EOS
    assert tok.decode(ex.input_ids) == WITH_INPUT + "sorted(x)"


def test_empty_and_overlong_rows_are_counted(tok):
    prompt_len = len(tok.encode(data.format_prompt(rec()), add_special_tokens=True))
    out = "return a + b " * 20
    answer = tok.encode(out)
    stats = data.TokenizeStats()
    assert data.tokenize_example(rec(output=""), tok, 512, stats=stats) is None
    assert data.tokenize_example(rec(output=" \n"), tok, 512, stats=stats) is None
    cut = data.tokenize_example(rec(output=out), tok, prompt_len + 5, stats=stats)
    assert cut.input_ids[prompt_len:] == answer[:4] + [EOS] and len(cut.input_ids) == prompt_len + 5  # B4
    assert cut.labels[-1] == EOS
    assert data.tokenize_example(rec(output=out), tok, prompt_len + 5, overlong="drop", stats=stats) is None
    assert data.tokenize_example(rec(output=out), tok, prompt_len + 1, stats=stats) is None  # no room: B5
    fits = data.tokenize_example(rec(output=out), tok, prompt_len + len(answer) + 1, overlong="drop", stats=stats)
    assert fits.input_ids[prompt_len:] == answer + [EOS]
    assert (stats.kept, stats.dropped_empty, stats.dropped_long, stats.truncated) == (2, 2, 2, 1)


def test_pad_equal_eos_keeps_eos_supervised(tok):
    same = Tokenizer(tok._tokenizer, BOS, EOS, None)  # Llama-3 style: pad falls back to eos
    assert same.pad_id == EOS
    ex = data.tokenize_example(rec(), same, 512)
    batch = data.collate_padded([ex, data.tokenize_example(rec(output="a"), same, 512)], same.pad_id)
    assert batch["labels"][0, len(ex.input_ids) - 2] == EOS  # the final EOS is a target (B6)


def test_settings_and_tokenizer_errors(tok):
    with pytest.raises(ConfigError):
        data.tokenize_example(rec(), tok, 512, overlong="cut")
    no_eos = Tokenizer(tok._tokenizer, BOS, None, PAD)
    with pytest.raises(DataError, match="no EOS"):
        data.tokenize_example(rec(), no_eos, 512)
    with pytest.raises(DataError, match="0 usable rows after tokenization"):
        data.tokenize_records([rec(output="")], tok, 512)


@pytest.mark.codealpaca
def test_real_2k_sample_tokenizes(tok):
    examples, stats = data.tokenize_records(data.load_records(codealpaca_2k()), tok, 4096, overlong="drop")
    assert (stats.kept, stats.dropped_empty, stats.dropped_long) == (2015, 2, 0) and len(examples) == 2015
    assert all(ex.labels[-1] == EOS and ex.input_ids[0] == BOS for ex in examples)


# ----------------------------------------------------------------------------------------- split

def test_split_is_seeded_disjoint_and_ordered():
    records = [rec(str(i)) for i in range(50)]
    train, test = data.split_records(records, 0.2, seed=3)
    assert len(test) == 10 and len(train) == 40
    assert sorted(train + test, key=lambda r: int(r["instruction"])) == records
    for part in (train, test):
        idx = [int(r["instruction"]) for r in part]
        assert idx == sorted(idx)
    assert data.split_records(records, 0.2, seed=3) == (train, test)
    assert data.split_records(records, 0.2, seed=4)[1] != test
    assert data.split_records(records, seed=3, test_size=10) == (train, test)
    assert data.split_records(records, 0.0)[1] == []


@pytest.mark.parametrize("kwargs, err", [({"test_fraction": 1.0}, ConfigError), ({"test_size": 5}, DataError),
                                         ({"test_fraction": 0.1, "test_size": 1}, ConfigError), ({}, ConfigError)])
def test_split_errors(kwargs, err):
    with pytest.raises(err):
        data.split_records([rec()] * 5, **kwargs)


# ----------------------------------------------------------------------------------------- batches

def examples_of(lengths, prompt=2):
    """Examples with distinct ids: `prompt` masked tokens then answer tokens."""
    out, next_id = [], 10
    for n in lengths:
        ids = list(range(next_id, next_id + n))
        next_id += n
        out.append(data.Example(ids, [-100] * prompt + ids[prompt:]))
    return out


def check_batch(batch, rows, pad_id):
    """Compare a collated batch with the rule written out token by token."""
    B, T = batch["input_ids"].shape
    for b, row in enumerate(rows):
        want_ids, want_labels, want_pos, want_seg = [], [], [], []
        for s, ex in enumerate(row, start=1):
            n = len(ex.input_ids)
            want_ids += ex.input_ids
            want_labels += [ex.labels[t + 1] if t + 1 < n else -100 for t in range(n)]
            want_pos += list(range(n))
            want_seg += [s] * n
        pad = T - len(want_ids)
        assert batch["input_ids"][b].tolist() == want_ids + [pad_id] * pad
        assert batch["labels"][b].tolist() == want_labels + [-100] * pad
        assert batch["positions"][b].tolist() == want_pos + [0] * pad
        assert batch["segments"][b].tolist() == want_seg + [0] * pad


def test_packing_labels_positions_segments():
    exs = examples_of([5, 3, 4, 6, 2])
    rows = data.pack_examples(exs, 10)
    assert [[len(e.input_ids) for e in r] for r in rows] == [[5, 3], [4, 6], [2]]
    batch = data.collate_packed(rows, pad_id=PAD, seq_len=10)
    check_batch(batch, rows, PAD)
    # every answer token is a target exactly once; no target crosses into the next example
    assert (batch["labels"] != -100).sum() == sum(len(e.input_ids) - 2 for e in exs)
    sup = batch["labels"] != -100
    assert torch.equal(batch["segments"][:, 1:][sup[:, :-1]], batch["segments"][:, :-1][sup[:, :-1]])
    assert torch.equal(batch["labels"][:, :-1][sup[:, :-1]], batch["input_ids"][:, 1:][sup[:, :-1]])


def test_padded_collate():
    exs = examples_of([4, 7])
    batch = data.collate_padded(exs, pad_id=PAD)
    assert batch["input_ids"].shape == (2, 7) and all(v.dtype == torch.long for v in batch.values())
    check_batch(batch, [[e] for e in exs], PAD)


def test_packed_attention_equals_separate_attention():
    """Through the mask, each packed example computes exactly what it computes alone (no leakage)."""
    exs = examples_of([5, 3, 4])
    torch.manual_seed(0)
    table = torch.randn(64, 3, 8)  # per token id: q, k, v
    pos_table = torch.randn(16, 8)

    def attend(batch):
        qkv = table[batch["input_ids"]] + pos_table[batch["positions"]][:, :, None]  # (B, T, 3, 8)
        q, k, v = (qkv[:, None, :, i] for i in range(3))
        mask = data.attention_mask(batch["segments"], batch["positions"])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)[:, 0]

    packed = attend(data.collate_packed([exs], PAD, seq_len=14))
    start = 0
    for ex in exs:
        alone = attend(data.collate_padded([ex], PAD))
        qkv = table[torch.tensor(ex.input_ids)] + pos_table[:len(ex.input_ids), None]
        causal = torch.nn.functional.scaled_dot_product_attention(*(qkv[None, :, i] for i in range(3)), is_causal=True)
        torch.testing.assert_close(alone, causal)
        n = len(ex.input_ids)
        torch.testing.assert_close(packed[0, start:start + n], alone[0])
        start += n
    assert torch.isfinite(packed).all()  # padding rows attend to padding, never to nothing


def test_attention_mask_by_hand():
    segments = torch.tensor([[1, 1, 1, 2, 2, 0]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 1, 0, 0],
                         [0, 0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(data.attention_mask(segments, positions), want[None, None])


def test_batch_order_is_deterministic_and_resumable():
    exs = examples_of([3, 5, 2, 7, 4, 6, 3, 2, 5, 4, 3])
    order = data.BatchOrder(exs, batch_size=2, seq_len=9, pad_id=PAD, seed=7)
    for epoch in (0, 1):
        plan = order.plan(epoch)
        flat = sorted(i for batch in plan for row in batch for i in row)
        assert flat == list(range(len(exs)))  # each example once per epoch
        full = list(order.batches(epoch))
        assert len(full) == order.num_batches(epoch)
        resumed = list(data.BatchOrder(exs, 2, 9, PAD, seed=7).batches(epoch, start=2))
        assert len(resumed) == len(full) - 2
        for a, b in zip(resumed, full[2:]):
            assert all(torch.equal(a[k], b[k]) for k in a)
        for batch, rows in zip(full, plan):
            check_batch(batch, [[exs[i] for i in row] for row in rows], PAD)
    assert order.plan(0) != order.plan(1)
    assert data.BatchOrder(exs, 2, 9, PAD, seed=8).plan(0) != order.plan(0)
    unpacked = data.BatchOrder(exs, 4, 9, PAD, seed=7, pack=False, drop_last=True)
    assert [len(b) for b in unpacked.plan(0)] == [4, 4]


def test_fingerprint_sees_one_token():
    a, b = examples_of([3, 4]), examples_of([3, 4])
    assert data.fingerprint(a) == data.fingerprint(b)
    b[1].input_ids[2] += 1
    assert data.fingerprint(a) != data.fingerprint(b)
