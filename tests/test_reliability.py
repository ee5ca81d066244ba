"""The reliability cases that no module test already covers; docs/reliability.md maps every case to its test.

A weights: a real malicious pickle never runs (A3, F1); the last 10 bytes cut (A1); float64 cast, int refused
  (A4); shape errors name the config field (A5); model_type absent (A7); shard index disagreements (A8); tied
  embeddings share storage (A11); config values we do not implement (A13).
B data: a bad dataset fails before the model loads (B1); no batch without a supervised token (B5); BOS once,
  and generation encodes the prompt as training does (B7); no EOS anywhere (B9); U+2028 and lone surrogates
  (B10).
C numerics: an inf gradient with a finite loss is caught by the norm (C3); fp16 refused (C7); the same seed
  twice gives the same bytes (C9).
D resume: the settings policy (D4, D5); a crash while a step is rewritten keeps it (D2, D7).
E resources, the preflight: disk (E1, E2), out of memory (E3), a non-finite first step, a
  tokenizer from another model, and the printed report.
F security: oversized and deeply nested JSON (F3); an output dir inside the base model (F4).
G kernels: NF4 round-trip error in bf16 (G2); the torch and Triton backends train to the same bytes (G6).
"""
import errno
import json
import logging
import os
import pickle
import shutil
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minilora import checkpoint as ckpt
from minilora import data, load_model
from minilora.config import TrainConfig, config_from_dict, config_from_values
from minilora.errors import (CheckpointError, ConfigError, DataError, NonFiniteError, ResumeError, TokenizerError,
                             WeightsError)
from minilora.lora import apply_lora, load_adapter, lora_parameters
from minilora.tokenizer import load_tokenizer
from tiny import make_checkpoint

from conftest import regen

pytestmark = pytest.mark.usefixtures("one_thread")






def _copy(base, tmp_path, name="base"):
    return shutil.copytree(base, tmp_path / name)


def _config(inputs, out, **overrides):
    base, data_file = overrides.pop("model", inputs[0]), overrides.pop("data", inputs[1])
    return regen.recipe_config(base, data_file, str(out), **overrides)


def _edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    raw = json.load(open(path))
    raw.update(changes)
    json.dump(raw, open(path, "w"))


# --------------------------------------------------------------------------------------- A. weights

class _CreatesFile:
    """Unpickling this calls open(path, "w"): the file appears iff the pickle was executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a3_f1_malicious_pickles_are_never_unpickled(inputs, tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_CreatesFile(str(proof))))
    assert proof.exists(), "the payload does run when unpickled"
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFile(str(marker)))

    only_pickle = _copy(inputs[0], tmp_path)
    os.remove(only_pickle / "model.safetensors")
    (only_pickle / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(WeightsError, match="pickle files.*convert them once to safetensors|Convert them once"):
        load_model(str(only_pickle))
    beside = _copy(inputs[0], tmp_path, "beside")  # safetensors wins; the .bin next to it is never opened
    (beside / "pytorch_model.bin").write_bytes(payload)
    model, _ = load_model(str(beside))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["q_proj"]}))
    (adapter / "adapter_model.bin").write_bytes(payload)
    with pytest.raises(CheckpointError, match="adapter_model.bin files are not loaded"):
        load_adapter(model, str(adapter))
    assert not marker.exists(), "a pickle was executed"


def test_a1_last_ten_bytes_cut(inputs, tmp_path):
    bad = _copy(inputs[0], tmp_path)
    data_bytes = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data_bytes[:-10])
    with pytest.raises(WeightsError, match=r"model\.safetensors.*ends at byte \d+ but the file has \d+ bytes"):
        load_model(str(bad))


def test_a4_float64_is_cast_with_a_warning_and_int_refused(inputs, tmp_path, caplog):
    good = _copy(inputs[0], tmp_path)
    tensors = load_file(str(good / "model.safetensors"))
    norm = tensors["model.norm.weight"].clone()
    tensors["model.norm.weight"] = norm.double()
    save_file(tensors, str(good / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="minilora.weights"):
        model, _ = load_model(str(good))
    assert model.model.norm.weight.dtype == torch.float32 and torch.equal(model.model.norm.weight, norm)
    assert "1 float64 tensors (model.norm.weight) cast to float32" in caplog.text
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(tensors, str(good / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"model\.norm\.weight.*int32, expected a floating dtype"):
        load_model(str(good))


def test_a5_shape_error_names_the_config_field(inputs, tmp_path):
    bad = _copy(inputs[0], tmp_path)
    _edit_config(bad, intermediate_size=48)  # the tensors are 96 wide
    with pytest.raises(WeightsError) as e:
        load_model(str(bad))
    assert ("'model.layers.0.mlp.up_proj.weight' has shape [96, 64], expected [48, 64] "
            "(from config.json: intermediate_size=48)") in str(e.value)


def test_a7_a13_config_values_we_do_not_implement():
    raw = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 2}
    config_from_dict(dict(raw))
    for change, words in [({"model_type": None}, "model_type None is not supported"),
                          ({"hidden_act": "relu2"}, "hidden_act 'relu2' is not implemented"),
                          ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "type 'yarn' is not implemented"),
                          ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window=true"),
                          ({"architectures": ["MambaForCausalLM"]}, "unsupported architecture 'MambaForCausalLM'")]:
        with pytest.raises(ConfigError, match=words):
            config_from_dict({**raw, **change})


def test_a8_shard_index_disagreements_name_shard_and_key(inputs, tmp_path):
    sharded = _copy(inputs[0], tmp_path)
    tensors = load_file(str(sharded / "model.safetensors"))
    os.remove(sharded / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    twice, stray = names[0], "model.layers.0.foo.weight"  # twice: listed for shard 1, also stored in shard 2
    save_file({k: tensors[k] for k in shards["model-00001-of-00002.safetensors"]} | {stray: torch.zeros(2)},
              str(sharded / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in shards["model-00002-of-00002.safetensors"] + [twice]},
              str(sharded / "model-00002-of-00002.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError) as e:
        load_model(str(sharded))
    msg = str(e.value)
    assert f"model-00002-of-00002.safetensors: tensor {twice!r} is not listed for this shard" in msg
    assert f"model-00001-of-00002.safetensors: tensor {stray!r} is not listed for this shard" in msg


def test_a11_tied_embeddings_share_storage(inputs):
    model, _ = load_model(inputs[0])
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ------------------------------------------------------------------------------------------ B. data

def test_b1_bad_dataset_fails_before_the_model_loads(tmp_path):
    from minilora.trainer import train

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    model = tmp_path / "model"  # a directory, so the model argument passes its check; it holds nothing to load
    model.mkdir()
    with pytest.raises(DataError, match="0 usable rows"):
        train(TrainConfig(model=str(model), data=str(empty), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tok(inputs):
    return load_tokenizer(inputs[0])


def test_b5_b7_every_row_supervised_bos_once_and_generation_encodes_the_same_prompt(tok):
    records = regen.synthetic_records(16)
    prompt_lengths = [len(tok.encode(data.format_prompt(r), add_special_tokens=True)) for r in records]
    with pytest.raises(DataError, match="0 usable rows after tokenization"):  # B5: no room for an answer anywhere
        data.tokenize_records(records, tok, max_len=min(prompt_lengths) + 1)
    for max_len in (min(prompt_lengths) + 2, max(prompt_lengths) + 3, 512):
        examples, stats = data.tokenize_records(records, tok, max_len=max_len)
        assert stats.kept + stats.dropped_long == len(records)
        batch = data.collate_padded(examples, tok.pad_id)
        assert ((batch["labels"] != -100).sum(1) >= 2).all(), "every row: at least one answer token and EOS"
    examples, _ = data.tokenize_records(records, tok, max_len=512)
    generation = tok.encode_batch([data.format_prompt(r) for r in records], add_special_tokens=True)
    for ex, prompt in zip(examples, generation):  # B7: generate.generate_text encodes prompts exactly so
        assert ex.input_ids[0] == tok.bos_id and ex.input_ids.count(tok.bos_id) == 1
        assert ex.input_ids[:len(prompt)] == prompt and ex.labels[:len(prompt)] == [-100] * len(prompt)
        assert ex.labels[-1] == tok.eos_id  # B6


def test_b9_tokenizer_without_eos(inputs, tmp_path):
    directory = tmp_path / "tok"
    directory.mkdir()
    shutil.copy(os.path.join(inputs[0], "tokenizer.json"), directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>"}))
    with pytest.raises(TokenizerError, match="no eos token.*add `eos_token` to tokenizer_config.json"):
        load_tokenizer(str(directory))


def test_b10_line_separators_and_lone_surrogates(tmp_path):
    row = {"instruction": "split\u2028here\x85too", "input": "", "output": "x"}
    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps(row, ensure_ascii=False) + "\n").encode())
    assert data.load_records(str(path)) == [row], "U+2028 and U+0085 are characters inside a JSON string"
    path.write_text(json.dumps(row) + "\n" + '{"instruction": "\\ud800", "input": "", "output": "x"}\n')
    with pytest.raises(DataError, match=r"line 2: 'instruction' holds '\\ud800' at character 0, an unpaired surrogate"):
        data.load_records(str(path))


# ------------------------------------------------------------------------------------- C. numerics

def test_c3_inf_gradient_with_a_finite_loss_is_skipped(inputs, tmp_path, monkeypatch):
    """A hook multiplies step 3's gradient by inf: the loss stays finite, the total norm does not."""
    import minilora.trainer as trainer
    from minilora.trainer import read_metrics, train

    real, calls = trainer.token_loss_sum, [0]

    def inf_gradient_on_call_3(model, batch, packed):
        calls[0] += 1
        loss, n = real(model, batch, packed)
        if calls[0] == 3:
            loss.register_hook(lambda grad: grad * float("inf"))
        return loss, n

    monkeypatch.setattr(trainer, "token_loss_sum", inf_gradient_on_call_3)
    out = tmp_path / "run"
    train(_config(inputs, out, grad_accum_steps=1, save_every=1, keep_last=10))
    records = [r for r in read_metrics(str(out / "metrics.jsonl")) if "loss" in r]
    assert [r["skipped"] for r in records] == [False, False, True, False]
    assert torch.isfinite(torch.tensor(records[2]["loss"])) and not torch.isfinite(torch.tensor(records[2]["grad_norm"]))
    adapter = {s: (out / "checkpoints" / f"step_00000{s}" / "adapter_model.safetensors").read_bytes() for s in (2, 3, 4)}
    assert adapter[2] == adapter[3] != adapter[4]


def test_c7_fp16_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match=r"--dtype='float16': expected one of \('auto', 'bfloat16', 'float32'\)"):
        config_from_values({"dtype": "float16"})


def test_c9_same_seed_twice_same_bytes(inputs, tmp_path):
    from minilora.trainer import read_metrics, train

    runs = []
    for name in ("a", "b"):
        train(_config(inputs, tmp_path / name, max_steps=3))
        runs.append(([r["loss"] for r in read_metrics(str(tmp_path / name / "metrics.jsonl")) if "loss" in r],
                     (tmp_path / name / "adapter" / "adapter_model.safetensors").read_bytes()))
    assert runs[0] == runs[1]


# ----------------------------------------------------------------------------------------- D. resume

def test_d4_d5_resume_policy():
    """Settings that change the model, the data or a step's meaning refuse; lr changes warn; data changes need
    --resume-allow-data-change."""
    from minilora.trainer import _check_resume

    config = TrainConfig(model="m", data="d.json")
    state = {"config": config.to_dict(), "data_fingerprint": "f" * 64}

    def check(**changes):
        fingerprint = changes.pop("fingerprint", "f" * 64)
        _check_resume(TrainConfig(**{**config.to_dict(), "lora_targets": config.lora_targets, **changes}), state,
                      None, {}, fingerprint)

    with pytest.raises(ResumeError, match="max_seq_len: 512 -> 128"):
        check(max_seq_len=128)
    with pytest.raises(ResumeError, match=r"lora_r: 64 -> 8.*lora_targets"):
        check(lora_r=8, lora_targets=("q_proj",))
    with pytest.raises(ResumeError, match="fingerprint"):
        check(fingerprint="0" * 64)
    check(fingerprint="0" * 64, resume_allow_data_change=True)
    check(learning_rate=1e-3, epochs=3)  # allowed (a warning is logged)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(6, 5)


def _tiny_run():
    torch.manual_seed(0)
    model = apply_lora(_Tiny(), r=2, alpha=4, targets=("q_proj",))
    opt = torch.optim.AdamW(list(lora_parameters(model).values()), lr=1e-2)
    model.q_proj(torch.randn(3, 6)).sum().backward()
    opt.step()
    return model, opt


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no `except Exception` catches it."""


@pytest.mark.parametrize("at", ["before the new copy is in place", "before the old copy is deleted"])
def test_d2_d7_crash_while_a_step_is_rewritten(tmp_path, monkeypatch, at):
    """A resumed run writes the step it resumed from again; with keep_last=1 that copy is the only complete
    checkpoint, so it must survive a crash at any point of the rewrite."""
    model, opt = _tiny_run()
    state = {"train_state": {"step": 4}, "config": {}}
    first = ckpt.save_checkpoint(str(tmp_path), 4, model, opt, state, keep_last=1)
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def rename(src, dst):
        if ".tmp-" in str(src) and at.startswith("before the new"):
            raise _Killed
        return real_rename(src, dst)

    def rmtree(path, *args, **kwargs):
        if ckpt.OLD_MARK in str(path) and at.startswith("before the old"):
            raise _Killed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    with pytest.raises(_Killed):
        ckpt.save_checkpoint(str(tmp_path), 4, model, opt, state, keep_last=1)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(str(tmp_path)) == first
    assert ckpt.verify_checkpoint(first) is None and os.listdir(tmp_path) == ["step_000004"]


# --------------------------------------------------------------------------------- E. preflight

def test_e1_full_disk_message_says_how_much(tmp_path, monkeypatch):
    model, opt = _tiny_run()

    def full(path, data_bytes, pause_halfway=0.0):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_file", full)
    with pytest.raises(CheckpointError, match=r"No space left on device.*needs ~0\.0 MiB.*intact"):
        ckpt.save_checkpoint(str(tmp_path), 1, model, opt, {"config": {}})
    assert os.listdir(tmp_path) == []


def test_e2_preflight_refuses_without_disk_for_checkpoints(inputs, tmp_path, monkeypatch):
    from minilora.trainer import train

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 1 << 20))
    with pytest.raises(CheckpointError, match=r"1\.0 MiB free, need ~3\.\d MiB"):
        train(_config(inputs, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_e3_preflight_out_of_memory_names_the_batch_and_what_to_do(inputs, tmp_path, monkeypatch):
    import minilora.trainer as trainer

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(trainer, "batch_loss", out_of_memory)
    with pytest.raises(ConfigError) as e:
        trainer.train(_config(inputs, tmp_path / "out", micro_batch_size=3, pack=True))
    msg = str(e.value)
    assert "micro-batch of 3 rows x 256 tokens does not fit in cpu memory" in msg
    assert "--micro-batch-size 3" in msg and "--max-seq-len 256 with --pack" in msg and "Tried to allocate" in msg
    assert "Lower --micro-batch-size and raise --grad-accum-steps" in msg
    assert not (tmp_path / "out").exists(), "no run directory before the preflight passes"


def test_preflight_non_finite_first_step(inputs, tmp_path, monkeypatch):
    import minilora.trainer as trainer

    real = trainer.batch_loss
    monkeypatch.setattr(trainer, "batch_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteError, match="preflight: the loss .* is not finite before any training step"):
        trainer.train(_config(inputs, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_preflight_tokenizer_of_another_model(tmp_path):
    """A 200-row embedding with the 320-token tokenizer: refused before the first batch, not an IndexError."""
    from minilora.trainer import train

    base = tmp_path / "base"
    make_checkpoint("llama", str(base), num_hidden_layers=1, vocab_size=200)
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps(regen.synthetic_records(4)))
    with pytest.raises(TokenizerError, match="embedding has 200 rows"):
        train(regen.recipe_config(str(base), str(data_file), str(tmp_path / "out")))


def test_preflight_report(inputs, tmp_path, caplog):
    """Rows read, skipped, dropped and truncated, the step's size and memory, the disk: logged before step 1."""
    from minilora.trainer import train

    rows = regen.synthetic_records(6) + [{"instruction": "Empty.", "input": "", "output": ""},
                                         {"instruction": "Long.", "input": "", "output": "x = 1\n" * 200},
                                         {"instruction": "No output key.", "input": ""}]
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("\n".join(json.dumps(r) for r in rows))
    with caplog.at_level(logging.INFO, logger="minilora.preflight"):
        train(_config(inputs, tmp_path / "out", data=str(data_file), skip_bad_rows=True, test_fraction=0.0,
                      max_steps=1))
    report = "\n".join(r.getMessage() for r in caplog.records if r.name == "minilora.preflight")
    assert "preflight: ok" in report
    assert "9 rows read, 1 bad rows skipped; 8 train / 0 held out" in report
    assert "kept 7, dropped 1 with an empty output and 0 over-long, truncated 1" in report
    assert "largest micro-batch 2 x 256 tokens: forward + backward ok" in report
    assert "per step estimated (weights" in report and "for checkpoints at" in report


# --------------------------------------------------------------------------------------- F. security

def test_f3_oversized_and_deeply_nested_json(inputs, tmp_path):
    big = _copy(inputs[0], tmp_path, "big")
    _edit_config(big, padding="x" * (10 * 2**20))
    with pytest.raises(ConfigError, match="too large for a config.json"):
        load_model(str(big))
    nested = _copy(inputs[0], tmp_path, "nested")
    (nested / "tokenizer_config.json").write_text('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(str(nested))
    (nested / "tokenizer.json").write_text('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot be read"):
        load_tokenizer(str(nested))
    (nested / "config.json").write_text('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(str(nested))


def test_f4_output_inside_the_base_model_is_refused(inputs, tmp_path):
    from minilora.trainer import train

    base = _copy(inputs[0], tmp_path)
    before = sorted(os.listdir(base))
    for out in (base, base / "run"):
        with pytest.raises(ConfigError, match="inside the base model directory"):
            train(_config(inputs, out, model=str(base)))
    assert sorted(os.listdir(base)) == before


def test_g2_bf16_round_trip_within_the_bitsandbytes_envelope():
    """G2's bf16 row (fp32/fp16: tests/test_nf4.py), on CPU: the NF4 reference runs in bf16 there too."""
    from minilora import nf4

    w = torch.randn(1024, 1024).to(torch.bfloat16)
    err = (nf4.dequantize_nf4(nf4.quantize_nf4(w, True)).float() - w.float()).abs()
    mean_abs, mean_rel = err.mean().item(), (err / (w.float().abs() + 1e-8)).mean().item()
    assert mean_abs < 0.072798 + 7 * 0.000074, f"mean abs error {mean_abs}"  # bitsandbytes' numbers, as test_nf4
    assert mean_rel < 0.203339 + 7 * 0.000340, f"mean rel error {mean_rel}"


def test_g6_torch_and_triton_backends_train_the_same(inputs, tmp_path):
    """Four NF4 steps of the expected-loss recipe: the Triton kernels (CPU interpreter) give the torch backend's
    losses and adapter bit for bit (bf16 and the bnb backend: tests/test_nf4_kernels.py, -m gpu)."""
    from minilora.trainer import read_metrics, train

    runs = {}
    for backend in ("torch", "triton"):
        train(_config(inputs, tmp_path / backend, quantize="nf4", backend=backend))
        runs[backend] = ([r["loss"] for r in read_metrics(str(tmp_path / backend / "metrics.jsonl")) if "loss" in r],
                         (tmp_path / backend / "adapter" / "adapter_model.safetensors").read_bytes())
    assert len(runs["torch"][0]) == 4 and runs["torch"] == runs["triton"], (runs["torch"][0], runs["triton"][0])


def test_every_error_type_is_a_value_or_runtime_error():
    """Promise 3: one module of error types, each a ValueError (bad input) or RuntimeError (state, environment)."""
    from minilora import errors

    types = [t for t in vars(errors).values() if isinstance(t, type) and issubclass(t, errors.MiniloraError)]
    assert len(types) == 10  # the base and its nine kinds
    for t in types:
        assert t is errors.MiniloraError or issubclass(t, (ValueError, RuntimeError)), t
