"""Training data: records (Alpaca, chat or prompt/completion, minilora/formats.py), answer-only labels in the
Alpaca or the chat prompt format, the split, padded and packed batches, and the batch order that a resumed
run replays exactly.

References: the prompt text and the label rule are sahil280114/codealpaca `train.py` (PROMPT_DICT; the
target is `output + eos`, labels -100 on the prompt), copied in docs/reference/README.md §3.1.
In the chat format the labels cover every assistant turn's content and end-of-turn token, as the
checkpoint's template renders them (minilora/chat_template.py). Bad input follows docs/reliability.md B1-B10
(rows named by file and row, over-long rows truncated or dropped and counted, truncated rows still end in
EOS, or the end-of-turn token, as torchtune's `truncate(eos_id=...)` does).

Batch convention. Every batch is a dict of (B, T) long tensors:
  input_ids  token ids, `pad_id` on padding.
  labels     ALREADY SHIFTED: labels[b, t] is the token the model must predict at position t, i.e. the
             token at t+1 of the same example, or -100. It is -100 on the prompt (except the last prompt
             token, which predicts the first answer token), at each example's last token (so a packed example
             never predicts the next example's first token) and on padding. The loss is
             `cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)`, with no further shift.
  positions  RoPE positions, restarting at 0 for every packed example; 0 on padding.
  segments   1, 2, 3, ... for the examples of a row in order, 0 on padding.
Packed examples never see each other: query q may attend key k only if segments[q] == segments[k] and
positions[k] <= positions[q] (`attention_mask` builds that mask).
"""
import hashlib
import json
import logging
import os
import random
import re
from array import array
from dataclasses import dataclass

import torch

from .errors import ConfigError, DataError, HubError
from .formats import (DATA_FORMATS, PROMPT_NO_INPUT, PROMPT_WITH_INPUT, alpaca_prompt, answer, detect_format,  # noqa: F401
                      format_prompt, normalize, row_problem, to_messages)

IGNORE_INDEX = -100
FIELDS = ("instruction", "input", "output")
# The Hugging Face copy of CodeAlpaca-20k; the GitHub repo is sahil280114/codealpaca.
HUB_DATASET = "sahil2801/CodeAlpaca-20k"
# The json file inside known hub copies of CodeAlpaca-20k; other repos must hold exactly one .json/.jsonl.
_HUB_FILES = {"sahil280114/codealpaca-20k": "code_alpaca_20k.json", "sahil2801/codealpaca-20k": "code_alpaca_20k.json"}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_MAX_LISTED = 5  # bad rows quoted in one error message

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- reading

def read_json_rows(path):
    """[(where, row)] from a JSON list or a JSONL file, and [(where, reason)] for JSONL lines that do not parse.

    `where` is "row i" (0-based index in a JSON list) or "line n" (1-based line of a JSONL file). The
    format is told from the content, not the extension (pandas writes JSONL into `.json` files).
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM is harmless: drop it (B10)
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}). "
                        "Re-encode the file as UTF-8.") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: dataset has 0 usable rows (the file is empty or only blank lines).")
    if stripped[0] == "[":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}). Fix the file.") from None
        except (ValueError, RecursionError) as e:  # an int of 5,000 digits, nesting deeper than Python's stack
            raise DataError(f"{path}: invalid JSON ({type(e).__name__}: {str(e)[:100]}). Fix the file.") from None
        return [(f"row {i}", row) for i, row in enumerate(rows)], []
    rows, bad = [], []
    # JSONL lines end at "\n" only: str.splitlines would also split at U+2028, U+0085, ... inside JSON strings
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            bad.append((f"line {n}", f"invalid JSON ({e.msg} at column {e.colno})"))
        except (ValueError, RecursionError) as e:
            bad.append((f"line {n}", f"invalid JSON ({type(e).__name__}: {str(e)[:100]})"))
    if not rows and stripped[0] == "{":  # one pretty-printed JSON object, not JSONL: say so
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            doc = None
        if isinstance(doc, dict):
            raise DataError(f"{path}: expected a JSON list of records or JSONL (one object per line), found one "
                            f"JSON object with keys {sorted(doc)[:5]}. Extract the list of records.")
    return rows, bad


def read_records(source, data_format="auto"):
    """(records, problems, data_format): the good records of a file or hub dataset, "where: why" for each bad
    row, and the format (told from the first record's keys when `data_format` is "auto")."""
    source = os.fspath(source)
    if data_format not in ("auto", *DATA_FORMATS):
        raise ConfigError(f"--data-format={data_format!r}: expected one of auto, {', '.join(DATA_FORMATS)}.")
    path = source if os.path.exists(source) else _download(source)
    rows, problems = read_json_rows(path)
    problems = [f"{where}: {why}" for where, why in problems]
    if data_format == "auto":  # the first record whose keys name a format; the others must follow it
        dicts = [row for _, row in rows if isinstance(row, dict)]
        data_format = next((f for row in dicts if (f := detect_format(row)) is not None), None)
        if data_format is None and dicts:
            raise DataError(f"{source}: no record's keys match a data format (the first has keys "
                            f"{sorted(dicts[0])[:8]}): expected alpaca (instruction, input, output), chat (messages) "
                            "or prompt/completion (prompt, completion). Convert the file, or name the format with "
                            "--data-format.")
        data_format = data_format or "alpaca"
    records = []
    for where, row in rows:
        why = row_problem(row, data_format)
        if why:
            problems.append(f"{where}: {why}")
        else:
            records.append(normalize(row, data_format))
    return records, problems, data_format


def load_records(source, skip_bad_rows=False, counts=None, data_format="auto"):
    """Records from a JSON list or JSONL file, or from a hub dataset id (default copy: `HUB_DATASET`), in the
    data format `data_format` ("auto": told from the keys; minilora/formats.py).

    Any bad row fails with one DataError listing the first few, unless `skip_bad_rows`: then they are
    dropped and their count logged. An empty result is always an error. `counts`, a dict, receives "rows",
    "bad_rows_skipped" and "data_format" (for the preflight report).
    """
    records, problems, data_format = read_records(source, data_format)
    total = len(records) + len(problems)
    if counts is not None:
        counts.update(rows=total, bad_rows_skipped=len(problems), data_format=data_format)
    listed = "; ".join(problems[:_MAX_LISTED]) + (" ..." if len(problems) > _MAX_LISTED else "")
    if not records:
        raise DataError(f"{source}: dataset has 0 usable rows ({len(problems)} rejected{': ' + listed if listed else ''}).")
    if problems and not skip_bad_rows:
        raise DataError(f"{source}: {len(problems)} of {total} rows are bad ({data_format} records): {listed}. "
                        "Fix them, or skip them with --skip-bad-rows.")
    if problems:
        log.warning("%s: skipped %d of %d bad rows (%s)", source, len(problems), total, listed)
    return records


def _download(source):
    """Local path of a hub dataset's json file; HubError without a network, DataError for a missing file."""
    if not _HUB_ID.match(source) or source.endswith((".json", ".jsonl")):
        raise DataError(f"{source}: no such file. Pass a JSON/JSONL file of records (--data FILE) "
                        f"or a hub dataset id such as {HUB_DATASET}.")
    try:
        from huggingface_hub import hf_hub_download, list_repo_files

        filename = _HUB_FILES.get(source.lower())
        if filename is None:
            files = [f for f in list_repo_files(source, repo_type="dataset") if f.endswith((".json", ".jsonl"))]
            if len(files) != 1:
                raise HubError(f"hub dataset {source} holds {len(files)} .json/.jsonl files ({files[:5]}), expected "
                               "one. Download the one you want and pass it with --data FILE.")
            filename = files[0]
        return hf_hub_download(source, filename, repo_type="dataset")
    except HubError:
        raise
    except Exception as e:  # offline, unknown repo, gated: huggingface_hub and httpx raise many types
        raise HubError(f"cannot download hub dataset {source} ({type(e).__name__}: {e}). With no network, download "
                       "the json file elsewhere and pass it with --data FILE.") from None


# ------------------------------------------------------------------------------------ prompt, tokens

@dataclass
class Example:
    """One tokenized record. `labels` is NOT shifted: -100 on the prompt, equal to `input_ids` on the answer."""
    input_ids: list
    labels: list


@dataclass
class TokenizeStats:
    kept: int = 0
    dropped_empty: int = 0
    dropped_long: int = 0
    truncated: int = 0

    def __str__(self):
        return (f"kept {self.kept}, dropped {self.dropped_empty} with an empty output and {self.dropped_long} "
                f"over-long, truncated {self.truncated}")


def tokenize_example(record, tok, max_len, overlong="truncate", stats=None, prompt_format="alpaca"):
    """An Example of at most `max_len` tokens, or None when the row is dropped (counted in `stats`).

    alpaca: prompt and answer are encoded separately, so the prompt ids are exactly what generation feeds the
    model. chat: the conversation rendered by the checkpoint's template, labels on the assistant turns.
    Over-long rows keep their start: with "truncate" the answer is cut and still ends in EOS (or the
    template's end-of-turn token) as docs/reliability.md B4 asks; a prompt that leaves no room for one answer token
    and EOS drops the row (B5).
    """
    if overlong not in ("truncate", "drop"):
        raise ConfigError(f"overlong={overlong!r}: expected 'truncate' or 'drop'.")
    if max_len < 2:
        raise ConfigError(f"max_len={max_len}: need at least 2 tokens (one answer token and EOS).")
    if tok.eos_id is None:
        raise DataError("the tokenizer has no EOS token: answers must end with EOS so the model learns to stop. "
                        "Set eos_token in tokenizer_config.json.")
    stats = stats if stats is not None else TokenizeStats()
    if prompt_format == "chat":
        return _tokenize_chat(record, tok, max_len, overlong, stats)
    answer_text = answer(record)
    answer_ids = tok.encode(answer_text) if answer_text.strip() else []
    if not answer_ids:
        stats.dropped_empty += 1
        return None
    prompt = tok.encode(alpaca_prompt(record), add_special_tokens=True)
    answer_ids = answer_ids + [tok.eos_id]
    if len(prompt) + len(answer_ids) > max_len:
        room = max_len - len(prompt) - 1  # answer tokens that fit in front of EOS
        if overlong == "drop" or room < 1:
            stats.dropped_long += 1
            return None
        answer_ids = answer_ids[:room] + [tok.eos_id]
        stats.truncated += 1
    stats.kept += 1
    return Example(prompt + answer_ids, [IGNORE_INDEX] * len(prompt) + answer_ids)


def _tokenize_chat(record, tok, max_len, overlong, stats):
    """tokenize_example for the chat prompt format: labels on every assistant turn's tokens."""
    if tok.chat_template is None:
        raise ConfigError("--prompt-format=chat: the tokenizer has no chat template; use --prompt-format alpaca.")
    messages = to_messages(record)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        stats.dropped_empty += 1
        return None
    ids, mask, end_of_turn = tok.chat_template.encode_with_mask(messages)
    if len(ids) > max_len:
        keep = max_len
        if overlong == "truncate" and mask[keep - 1] and mask[keep]:  # the cut falls inside an assistant turn
            if mask[keep - 2]:  # the turn still ends where the model must learn to stop (B4)
                turn = sum(1 for t in range(keep) if mask[t] and (t == 0 or not mask[t - 1])) - 1
                ids = ids[:keep - 1] + [end_of_turn[turn]]
            else:  # only its first token would be left: the turn goes
                keep -= 1
        ids, mask = ids[:keep], mask[:keep]
        if overlong == "drop" or not any(mask):
            stats.dropped_long += 1
            return None
        stats.truncated += 1
    stats.kept += 1
    return Example(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)])


def tokenize_records(records, tok, max_len, overlong="truncate", prompt_format="alpaca"):
    """(examples, stats) for all records; DataError if none survive (B1/B5)."""
    stats = TokenizeStats()
    examples = []
    for i, r in enumerate(records):
        try:
            ex = tokenize_example(r, tok, max_len, overlong, stats, prompt_format)
        except DataError as e:  # a record that has no form in this prompt format
            raise DataError(f"record {i}: {e}") from None
        if ex is not None:
            examples.append(ex)
    if not examples:
        raise DataError(f"dataset has 0 usable rows after tokenization ({stats}; max_len {max_len}). "
                        "Raise --max-seq-len or check the outputs.")
    return examples, stats


def fingerprint(examples):
    """sha256 of the token ids and labels: a resumed run checks that it trains on the same data (D4)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(array("q", [len(ex.input_ids)] + ex.input_ids + ex.labels).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- split

def split_records(records, test_fraction=None, seed=0, test_size=None):
    """(train, test): a seeded random choice of test rows; both keep the file's order.

    Give `test_fraction` (test rows = round(fraction * n)) or `test_size` (an int). The same records and
    seed always give the same split (Python's `random.Random(seed).shuffle`).
    """
    n = len(records)
    if (test_fraction is None) == (test_size is None):
        raise ConfigError("split_records: give exactly one of test_fraction or test_size.")
    if test_size is None:
        if not 0 <= test_fraction < 1:
            raise ConfigError(f"test_fraction={test_fraction}: expected 0 <= fraction < 1.")
        test_size = round(n * test_fraction)
    if not isinstance(test_size, int) or not 0 <= test_size < n:
        raise DataError(f"test_size={test_size!r} leaves no training rows: the dataset has {n} rows.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    is_test = [False] * n
    for i in order[:test_size]:
        is_test[i] = True
    return ([r for r, t in zip(records, is_test) if not t], [r for r, t in zip(records, is_test) if t])


# ----------------------------------------------------------------------------------------- batches

def _pack(lengths, seq_len):
    """Greedy packing in the given order: rows of indices into `lengths`, each row summing to <= seq_len."""
    rows, row, used = [], [], 0
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise DataError(f"an example of {n} tokens does not fit seq_len={seq_len}; tokenize with max_len <= seq_len.")
        if used + n > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    return rows + [row] if row else rows


def pack_examples(examples, seq_len):
    """Rows of examples in their given order, each row as many as fit in `seq_len` tokens (greedy)."""
    return [[examples[i] for i in row] for row in _pack([len(ex.input_ids) for ex in examples], seq_len)]


def collate_packed(rows, pad_id, seq_len=None):
    """A batch (module docstring) of rows, each a list of Examples laid end to end.

    T is `seq_len`, or the longest row when None. Labels are shifted per example, so nothing crosses
    from one example into the next.
    """
    lengths = [sum(len(ex.input_ids) for ex in row) for row in rows]
    T = seq_len if seq_len is not None else max(lengths)
    if max(lengths) > T:
        raise DataError(f"a row of {max(lengths)} tokens does not fit seq_len={T}.")
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segments = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for s, ex in enumerate(row, start=1):
            n = len(ex.input_ids)
            input_ids[b, t:t + n] = torch.tensor(ex.input_ids)
            labels[b, t:t + n] = torch.tensor(ex.labels[1:] + [IGNORE_INDEX])  # the shift, inside one example
            positions[b, t:t + n] = torch.arange(n)
            segments[b, t:t + n] = s
            t += n
    return {"input_ids": input_ids, "labels": labels, "positions": positions, "segments": segments}


def collate_padded(examples, pad_id, seq_len=None):
    """One example per row, right-padded: the packed layout with one segment per row."""
    return collate_packed([[ex] for ex in examples], pad_id, seq_len)


def attention_mask(segments, positions):
    """(B, 1, T, T) bool, True where query q may attend key k: same segment and positions[k] <= positions[q].

    Padding (segment 0, position 0) attends only to padding, so no row of the mask is empty.
    """
    same = segments[:, :, None] == segments[:, None, :]
    causal = positions[:, None, :] <= positions[:, :, None]
    return (same & causal)[:, None]


class BatchOrder:
    """The training batches of each epoch in an order fixed by (seed, epoch).

    Each epoch shuffles the examples with `random.Random(f"{seed}:{epoch}")`, then packs them into rows of
    `seq_len` tokens (or one example per row when `pack` is False) and groups `batch_size` rows per batch.
    `batches(epoch, start)` skips the first `start` batches without building them, so a run resumed from
    (epoch, batches consumed) sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, examples, batch_size, seq_len, pad_id, seed=0, pack=True, drop_last=False):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: expected >= 1.")
        self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
        self.pad_id, self.seed, self.pack, self.drop_last = pad_id, seed, pack, drop_last

    def plan(self, epoch):
        """The epoch's batches as lists of rows of example indices."""
        order = list(range(len(self.examples)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        if self.pack:
            rows = [[order[j] for j in row] for row in _pack([len(self.examples[i].input_ids) for i in order], self.seq_len)]
        else:
            rows = [[i] for i in order]
        batches = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def num_batches(self, epoch):
        return len(self.plan(epoch))

    def batches(self, epoch, start=0):
        """Yield the epoch's batches from number `start` (0-based) on."""
        for rows in self.plan(epoch)[start:]:
            yield collate_packed([[self.examples[i] for i in row] for row in rows], self.pad_id,
                                 self.seq_len if self.pack else None)
