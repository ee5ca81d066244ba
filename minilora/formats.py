"""Dataset record formats and prompt formats: what a row holds, and how it becomes a prompt and an answer.

Data formats, told from a record's keys (or chosen with --data-format), the three that TRL's SFTTrainer,
torchtune and unsloth accept:
  alpaca             {"instruction", "input", "output"} (sahil280114/codealpaca, JSON list or JSONL)
  chat               {"messages": [{"role", "content"}, ...]}: an optional system message first, then user and
                     assistant turns alternating, ending with an assistant turn (roles as in torchtune's
                     `validate_messages`; any other role is an error)
  prompt_completion  {"prompt", "completion"}: strings, or lists of messages (TRL's conversational form)
Prompt formats (--prompt-format):
  alpaca  the Alpaca prompt of sahil280114/codealpaca `train.py` (PROMPT_DICT) for alpaca records, the
          prompt text itself for prompt/completion records, the user turn in the Alpaca template for a
          single-turn chat record; the answer follows, then EOS.
  chat    the checkpoint's chat template (minilora/chat_template.py) over the record's messages: an alpaca
          record is one exchange (user = instruction, a blank line and the input when there is one;
          assistant = output), a prompt/completion record is user = prompt, assistant = completion.
"""
from .errors import ConfigError, DataError

DATA_FORMATS = ("alpaca", "chat", "prompt_completion")
ALPACA_FIELDS = ("instruction", "input", "output")
ROLES = ("system", "user", "assistant")

# The reference's PROMPT_DICT, character for character: no newline or space after "### Response:".
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:")


def format_prompt(record):
    """The Alpaca prompt; the no-input form when `input` is the empty string."""
    template = PROMPT_WITH_INPUT if record["input"] != "" else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record["input"])


# ------------------------------------------------------------------------------------------ reading

def detect_format(row):
    """The data format a record's keys say, or None."""
    if "messages" in row:
        return "chat"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return None


def _text_problem(value, name):
    if not isinstance(value, str):
        shown = f" ({value!r})" if isinstance(value, (int, float)) else ""  # not a list: it may nest 900 deep
        return f"{name} is {type(value).__name__}{shown}, expected a string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800": valid JSON, not text (B10)
        return f"{name} holds {value[e.start]!r} at character {e.start}, an unpaired surrogate, not Unicode text"
    return None


def messages_problem(messages, name="'messages'"):
    """Why `messages` is not a trainable conversation, or None (rules in the module docstring)."""
    if not isinstance(messages, list) or not messages:
        return f"{name} must be a non-empty list of {{role, content}} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i} must be an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"message {i} has unknown role {m['role']!r} (known: {', '.join(ROLES)})"
        why = _text_problem(m["content"], f"message {i}'s content")
        if why:
            return why
    expected = "user"
    for i, m in enumerate(messages):
        if m["role"] == "system":
            if i != 0:
                return f"system message at index {i}: a system message must come first"
            continue
        if m["role"] != expected:
            return f"message {i} is {m['role']!r} where {expected!r} was expected (user and assistant alternate)"
        if m["role"] == "assistant" and not m["content"].strip():
            return f"message {i} is an empty assistant message (nothing to learn)"
        expected = "assistant" if expected == "user" else "user"
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's (the answer to learn or to score against)"
    return None


def row_problem(row, data_format):
    """Why `row` is not a record of `data_format`, or None."""
    if not isinstance(row, dict):
        return f"expected an object ({data_format} record), found {type(row).__name__}"
    if data_format == "alpaca":
        missing = [k for k in ALPACA_FIELDS if k not in row]
        if missing:
            return f"missing key {missing[0]!r} (a record needs {list(ALPACA_FIELDS)}; use \"input\": \"\" when there is none)"
        return next(filter(None, (_text_problem(row[k], repr(k)) for k in ALPACA_FIELDS)), None)
    if data_format == "chat":
        if "messages" not in row:
            return "missing key 'messages' (a chat record is {\"messages\": [{\"role\": ..., \"content\": ...}, ...]})"
        return messages_problem(row["messages"])
    missing = [k for k in ("prompt", "completion") if k not in row]
    if missing:
        return f"missing key {missing[0]!r} (a prompt/completion record needs 'prompt' and 'completion')"
    if isinstance(row["prompt"], list) and isinstance(row["completion"], list):  # TRL's conversational form
        if not all(isinstance(m, dict) and m.get("role") == "assistant" for m in row["completion"]):
            return "'completion' messages must all be assistant messages"
        return messages_problem(row["prompt"] + row["completion"], "'prompt' + 'completion'")
    return _text_problem(row["prompt"], "'prompt'") or _text_problem(row["completion"], "'completion'")


def normalize(row, data_format):
    """The record as the rest of minilora reads it (a checked row; extra keys dropped)."""
    if data_format == "alpaca":
        return {k: row[k] for k in ALPACA_FIELDS}
    if data_format == "chat":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
    if isinstance(row["prompt"], list):
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["prompt"] + row["completion"]]}
    return {"prompt": row["prompt"], "completion": row["completion"]}


def record_format(record):
    """The data format of a normalized record."""
    return "chat" if "messages" in record else "alpaca" if "instruction" in record else "prompt_completion"


# ------------------------------------------------------------------------------------ prompt formats

def resolve_prompt_format(requested, has_template, data_format):
    """'alpaca' or 'chat': `requested` unless 'auto', which is chat only for chat data on a checkpoint with a
    chat template. ConfigError for chat without a template."""
    if requested == "auto":
        return "chat" if has_template and data_format == "chat" else "alpaca"
    if requested == "chat" and not has_template:
        raise ConfigError("--prompt-format=chat: the model has no chat template (no chat_template.jinja, no "
                          "chat_template in tokenizer_config.json); use --prompt-format alpaca.")
    if requested not in ("alpaca", "chat"):
        raise ConfigError(f"--prompt-format={requested!r}: expected one of auto, alpaca, chat.")
    return requested


def to_messages(record):
    """The record as a conversation (module docstring)."""
    if "messages" in record:
        return record["messages"]
    if "instruction" in record:
        user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]


def answer(record):
    """The text to learn and to score against: output, completion, or the last assistant turn."""
    if "messages" in record:
        return record["messages"][-1]["content"]
    return record["output"] if "instruction" in record else record["completion"]


def alpaca_prompt(record):
    """The prompt text of the alpaca prompt format; DataError for a chat record of several exchanges."""
    if "instruction" in record:
        return format_prompt(record)
    if "prompt" in record:
        return record["prompt"]
    turns = record["messages"]
    system = turns[0]["content"] if turns[0]["role"] == "system" else None
    turns = turns[1:] if system is not None else turns
    if len(turns) != 2:
        raise DataError(f"a chat record of {len(turns) // 2} exchanges has no Alpaca form: train it with "
                        "--prompt-format chat.")
    instruction = turns[0]["content"] if system is None else f"{system}\n\n{turns[0]['content']}"
    return format_prompt({"instruction": instruction, "input": ""})


def generation_prompt(record, prompt_format, tok):
    """What generation continues to answer `record`: a string (alpaca; encoded with BOS as in training) or
    token ids (chat: the conversation up to its last assistant turn, with the template's generation prompt)."""
    if prompt_format == "alpaca":
        return alpaca_prompt(record)
    return tok.apply_chat_template(to_messages(record)[:-1], add_generation_prompt=True)
