"""Model names: short names of the study's models, any hub id, or a local directory.

Downloads go through `huggingface_hub.snapshot_download`, restricted to safetensors, JSON and tokenizer
files (never pickle weights), with an optional pinned revision and `HF_TOKEN` for gated repos (Llama,
Gemma). Without a network the error says so and how to pass a local directory instead.
"""
import os

from .errors import HubError

# The published study's models (and a few small ones), short name -> hub repo id.
SHORT_NAMES = {
    "llama3-1b": "meta-llama/Llama-3.2-1B",
    "llama3-3b": "meta-llama/Llama-3.2-3B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B",
    "gemma-2b": "google/gemma-2b",
    "gemma2-2b": "google/gemma-2-2b",
    "phi3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    # instruct models with a chat template (the study's untuned chat-format baselines and its reference row)
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "qwen2.5-coder-0.5b-instruct": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    "qwen2.5-coder-1.5b-instruct": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
}
ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


def check_model_name(name_or_dir):
    """HubError, without touching the network, for a model argument that cannot work: a path that does not
    exist (it starts with / . ~, or has more than one /) or is not a directory, or a name that is neither a
    short name nor a hub id (owner/name). Callers run it before any other slow step (train.py: before the
    dataset, which may be downloaded)."""
    if os.path.isdir(name_or_dir):
        return
    repo_id = SHORT_NAMES.get(name_or_dir, name_or_dir)
    if os.path.exists(name_or_dir):
        raise HubError(f"model {name_or_dir!r} is a file, not a directory: pass the checkpoint directory (the one "
                       "holding config.json and the safetensors files).")
    if repo_id.startswith(("/", ".", "~")) or repo_id.count("/") > 1 or repo_id.endswith("/"):
        raise HubError(f"model {name_or_dir!r}: no such directory.")
    if repo_id.count("/") != 1:
        raise HubError(f"model {name_or_dir!r}: no such directory, and not a hub id (owner/name) or a short name "
                       f"({', '.join(SHORT_NAMES)}).")


def resolve_model_dir(name_or_dir, revision=None, token=None, cache_dir=None):
    """A local directory holding config.json, downloading from the hub if `name_or_dir` is not one."""
    check_model_name(name_or_dir)
    if os.path.isdir(name_or_dir):
        return name_or_dir
    repo_id = SHORT_NAMES.get(name_or_dir, name_or_dir)
    # "ckpts/smollm2" is a hub id as far as its text goes, but more likely a mistyped directory: say both
    local = "" if repo_id != name_or_dir else f"no such directory {name_or_dir!r}, and as a hub id: "
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS, cache_dir=cache_dir,
                                 token=token or os.environ.get("HF_TOKEN"))
    except GatedRepoError:
        raise HubError(f"{local}{repo_id} is gated: accept its license on huggingface.co and set HF_TOKEN "
                       "(or run `huggingface-cli login`).") from None
    except RepositoryNotFoundError:
        raise HubError(f"{local}{repo_id} was not found on the hub (or is private: set HF_TOKEN).") from None
    except RevisionNotFoundError:
        raise HubError(f"{local}{repo_id} has no revision {revision!r}.") from None
    except LocalEntryNotFoundError:
        raise HubError(f"{local}cannot download {repo_id}: the Hugging Face hub is unreachable (no network?) and it is not "
                       "in the local cache. Download it elsewhere and pass the local directory instead, e.g. "
                       f"--model /path/to/{repo_id.split('/')[1]}.") from None
    except OSError as e:  # requests' ConnectionError and friends
        raise HubError(f"{local}cannot download {repo_id}: {e}. With no network, pass a local directory as the model.") from None
