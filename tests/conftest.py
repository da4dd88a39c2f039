"""Shared fixtures: the real-text tokenizer, tiny in-process teachers of every supported family, offline
hub settings."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one OpenMP thread in every process the tests start too (CLI runs, workers, torchrun, benchmark scripts):
# with two pytest workers (`-n 2`) on 2 cores, a child with 2 threads oversubscribes them
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# tiny models gain nothing from a second thread, and oversubscribed threads on a busy 2-core
# machine make each step ~100x slower
torch.set_num_threads(1)

from nas.testing import tiny_model, tiny_tokenizer  # noqa: E402

FAMILY_CASES = [
    ("llama", False, 2),
    ("llama", True, 4),
    ("mistral", False, 2),
    ("qwen2", True, 2),
    ("qwen2", False, 4),
    ("qwen3", True, 2),
    ("qwen3", False, 4),
    ("gemma3_text", True, 2),
    ("gemma3_text", False, 4),
    ("phi3", False, 2),
    ("phi3", True, 4),
    ("olmo2", False, 2),
    ("olmo2", True, 2),
    ("olmo3", True, 2),
    ("smollm3", True, 2),
    ("smollm3", False, 4),
    ("qwen3_moe", False, 2),
    ("qwen3_moe", True, 4),
    ("mixtral", True, 2),
    ("mixtral", False, 2),
    ("qwen3_5_text", False, 2),
    ("qwen3_5_text", True, 4),
    ("qwen3_5_moe_text", False, 2),
    ("qwen3_5_moe_text", True, 4),
    ("nemotron_h", False, 2),
    ("nemotron_h", True, 4),  # a tied config: NemotronHForCausalLM keeps its head untied all the same
    ("ministral3", False, 2),
    ("ministral3", True, 4),
    ("gpt_oss", False, 2),
    ("gpt_oss", True, 4),
    ("gemma4_text", True, 2),
    ("gemma4_text", False, 4),
]


@pytest.fixture(scope="session")
def tokenizer():
    """A 320-token byte-level BPE tokenizer trained on real text (KJV verses), shared by every test."""
    return tiny_tokenizer(320)


@pytest.fixture(params=FAMILY_CASES, ids=lambda c: f"{c[0]}-{'tied' if c[1] else 'untied'}-kv{c[2]}")
def family_model(request):
    """A tiny random model of each family, tied/untied, GQA (kv=2) and MHA (kv=4) (MoE: 4 experts, top-2)."""
    model_type, tied, groups = request.param
    return tiny_model(model_type, tie_word_embeddings=tied, num_query_groups=groups)
