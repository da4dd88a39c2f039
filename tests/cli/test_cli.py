"""The `nas` command: the documented flows and one-line errors (exit 2) on bad input."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from nas.cli.main import main
from nas.model.arch import Arch
from nas.model.size import count_params
from nas.testing import tiny_study_config, write_kjv_corpus, write_tiny_teacher


@pytest.fixture(scope="module")
def qwen2_teacher(tmp_path_factory):
    """A 4-layer Qwen2-style teacher with tied embeddings and GQA 4:2, plus real text."""
    root = tmp_path_factory.mktemp("qwen2")
    write_tiny_teacher(
        root / "teacher", "qwen2", tie_word_embeddings=True, num_attention_heads=4, num_query_groups=2
    )
    write_kjv_corpus(root / "corpus.jsonl", limit=3000)
    return root


def test_importance_then_prune_writes_a_plain_transformers_model(qwen2_teacher, capsys):
    root = qwen2_teacher
    imp = root / "imp.safetensors"
    data = ["--data", str(root / "corpus.jsonl"), "--seq-len", "32", "--cache-dir", str(root / "cache")]
    assert (
        main(
            [
                "importance",
                str(root / "teacher"),
                *data,
                "--out",
                str(imp),
                "--num-samples",
                "16",
                "--val-sequences",
                "4",
            ]
        )
        == 0
    )
    out = root / "pruned"
    knobs = [
        "--num-layers",
        "3",
        "--hidden-size",
        "48",
        "--num-attention-heads",
        "2",
        "--num-query-groups",
        "1",
    ]
    assert main(["prune", str(root / "teacher"), str(out), "--importance", str(imp), *knobs]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    arch = Arch.from_hf_config(model.config)
    assert (arch.num_layers, arch.hidden_size, arch.num_attention_heads, arch.num_query_groups) == (
        3,
        48,
        2,
        1,
    )
    assert sum(p.numel() for p in model.parameters()) == count_params(arch)
    assert model.config.tie_word_embeddings and model.config.head_dim == 16
    kept = json.loads((out / "nas_pruning.json").read_text())["cut"]
    assert len(kept["layers"]) == 3 and len(kept["hidden"]) == 48
    assert (out / "tokenizer.json").is_file()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_prune_with_data_computes_importance_itself(qwen2_teacher):
    root = qwen2_teacher
    data = ["--data", str(root / "corpus.jsonl"), "--seq-len", "32", "--cache-dir", str(root / "cache")]
    out = root / "pruned-data"
    args = ["prune", str(root / "teacher"), str(out), *data, "--num-samples", "8", "--val-sequences", "2"]
    assert (
        main([*args, "--ffn-hidden-size", "64", "--depth-strategy", "contiguous", "--num-layers", "2"]) == 0
    )
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("nas: error:") and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line_errors(qwen2_teacher, tmp_path, capsys):
    teacher = str(qwen2_teacher / "teacher")
    imp = ["--importance", str(tmp_path / "none.safetensors")]
    assert "multiple of num_query_groups" in one_line_error(
        capsys, ["prune", teacher, str(tmp_path / "o"), *imp, "--num-attention-heads", "3"]
    )
    assert "larger than the teacher" in one_line_error(
        capsys, ["prune", teacher, str(tmp_path / "o"), *imp, "--num-layers", "9"]
    )
    assert "does not exist" in one_line_error(
        capsys, ["prune", str(tmp_path / "missing"), str(tmp_path / "o"), *imp]
    )
    assert "exactly one of --importance" in one_line_error(capsys, ["prune", teacher, str(tmp_path / "o")])
    assert "nearest feasible" in one_line_error(capsys, ["space", teacher, "--budget", "1%"])


def test_unknown_model_type_is_a_one_line_error(tmp_path, capsys):
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_layer": 1,
        "n_embd": 8,
        "n_head": 2,
        "vocab_size": 10,
    }
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, ["space", str(tmp_path / "m"), "--budget", "50%"])
    assert "unsupported model_type 'gpt2'" in err and "qwen3" in err


def test_space_prints_the_candidate_table(qwen2_teacher, capsys):
    assert main(["space", str(qwen2_teacher / "teacher"), "--budget", "75%", "--tolerance", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "candidates" in out and "kv_cache_bytes_per_token" in out
    from nas.model.arch import Arch
    from nas.model.load import load_config
    from nas.prune.space import parse_budget

    budget = parse_budget("75%", Arch.from_hf_config(load_config(qwen2_teacher / "teacher")))
    assert f"search horizon (default): {round(0.225 * budget):,} KD tokens per candidate" in out


def test_space_over_budgets_with_a_memory_limit(qwen2_teacher, capsys):
    teacher = str(qwen2_teacher / "teacher")
    args = ["space", teacher, "--budget", "50%,75%", "--tolerance", "0.1", "--seq-len", "64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[2:-1]]  # the last line: the horizon in tokens
    assert {r[0] for r in rows} == {"50%", "75%"} and "memory_bytes" in out
    limit = sorted(int(r[8]) for r in rows)[len(rows) // 2]  # memory_bytes (the label is 4 words)
    assert main([*args, "--max-memory", str(limit)]) == 0
    out = capsys.readouterr().out
    over = [line.split() for line in out.splitlines()[3:-1]]
    assert all((r[-1] == "True") == (int(r[8]) > limit) for r in over)
    assert f"over the memory limit {limit}" in out
    assert "--batch must be >= 1" in one_line_error(capsys, [*args, "--batch", "0"])
    assert "cannot read memory" in one_line_error(capsys, [*args, "--max-memory", "lots"])


def test_bad_study_toml_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "s.toml").write_text(
        'teacher = "x"\n[data]\nsources = [{path = "c.jsonl"}]\n[search]\nhorizon = 3\n'
    )
    err = one_line_error(capsys, ["search", str(tmp_path / "s.toml")])
    assert "unknown field(s) horizon in [search]" in err and "horizon_tokens" in err
    (tmp_path / "t.toml").write_text(
        'teacher = "x"\nbudget = "50%"\n[data]\nsources = [{path = "c.jsonl"}]\n[search]\npruner = "median"\n'
    )
    assert "pruner must be one of" in one_line_error(capsys, ["search", str(tmp_path / "t.toml")])
    assert "does not exist" in one_line_error(capsys, ["run", str(tmp_path / "missing.toml")])


@pytest.mark.slow
def test_search_and_run_from_a_study_toml(tmp_path, capsys):
    config = tiny_study_config(tmp_path, search={"n_trials": 2})
    lines = [
        f'name = "{config["name"]}"',
        f'teacher = "{config["teacher"]}"',
        f'out_dir = "{config["out_dir"]}"',
        f'budget = "{config["budget"]}"',
    ]
    for section in ("data", "space", "importance", "search", "distill", "final"):
        lines.append(f"[{section}]")
        for key, value in config[section].items():
            lines.append(
                f"{key} = {json.dumps(value) if not isinstance(value, (list, dict)) else toml_value(value)}"
            )
    (tmp_path / "tiny.toml").write_text("\n".join(lines) + "\n")
    assert main(["run", str(tmp_path / "tiny.toml")]) == 0
    out = capsys.readouterr().out
    assert "winner val loss" in out and (tmp_path / "studies" / "tiny" / "winner" / "config.json").is_file()


def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[ " + ", ".join(toml_value(v) for v in value) + " ]"
    return json.dumps(value)


def test_the_default_horizon_of_an_active_budget_counts_active_parameters():
    from nas.cli.study_commands import horizon_line
    from nas.model.arch import Arch
    from nas.model.size import count_params
    from nas.testing import tiny_config

    teacher = Arch.from_hf_config(tiny_config("qwen3_moe"))
    active, total = count_params(teacher, active=True), count_params(teacher)
    assert active < total
    assert f"{round(0.225 * int(active * 0.5)):,} KD tokens" in horizon_line(None, teacher, ["50%"], "active")
    assert f"{round(0.225 * int(total * 0.5)):,} KD tokens" in horizon_line(None, teacher, ["50%"])


def test_nas_help_opens_with_what_nas_does(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]  # after the usage lines: one line (argparse wraps at 80 columns)
    assert description == "Find the best small language model inside a big one: prune, distill, compare."
    assert "nas demo" in text
