"""``vfuse sweep`` on real tiny checkpoints: grids and zip mode, byte-identity of the evaluated
weights with ``vfuse merge``, perplexity against a direct transformers computation, resume
after an interrupted sweep, the VLM←LLM case, and bad sweep files refused before any work."""
from __future__ import annotations

import csv
import os
import sys

import pytest
import torch
import yaml
from checkpoints import family, llama, load_tensors, perturbed, qwen2, qwen2_vl, save, save_state_dict, write_yaml

from vfuse_kernels.cli import main as cli_main
from vfuse_kernels.merging import ConfigError, merge_checkpoints
from vfuse_kernels.merging.sweep import _InMemory, load_model, load_sweep, run_sweep

sys.path.insert(0, os.path.dirname(__file__))  # eval.callable: sweep_metrics:<name>
import sweep_metrics  # noqa: E402

WORDS = "the a cat dog sat on mat and ran far away big small red blue green".split()
TEXT = " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(60))


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def llama_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base, tuned = family(str(root), llama, n=2)
    _tokenizer().save_pretrained(base)
    text = root / "text.txt"
    text.write_text(TEXT)
    return base, tuned, str(text)


def _sweep_file(tmp_path, text: str) -> str:
    return write_yaml(str(tmp_path / "sweep.yml"), text)


GRID = """
merge_method: ties
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {ft1}, parameters: {{weight: 0.5, density: 0.5}}}}
sweep:
  models.0.parameters.weight: [0.3, 0.7]
  models.1.parameters.weight: [0.2, 0.5, 0.9]
eval:
  perplexity: {text}
  context_length: 128
"""


def _grid(tmp_path, llama_family, text=GRID, **extra):
    base, tuned, text_file = llama_family
    return _sweep_file(tmp_path, text.format(base=base, ft0=tuned[0], ft1=tuned[1], text=text_file, **extra))


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grid_writes_every_row_the_best_config_and_the_plot(llama_family, tmp_path):
    out = str(tmp_path / "out")
    assert cli_main(["sweep", _grid(tmp_path, llama_family), "--out", out, "--quiet",
                     "--save-best", str(tmp_path / "best")]) == 0
    rows = _read_csv(os.path.join(out, "results.csv"))
    assert [r["config_id"] for r in rows] == [f"c{i:03d}" for i in range(6)]
    assert [(r["models.0.parameters.weight"], r["models.1.parameters.weight"]) for r in rows] == [
        (a, b) for a in ("0.3", "0.7") for b in ("0.2", "0.5", "0.9")]
    ppl = [float(r["perplexity"]) for r in rows]
    assert all(p > 1 for p in ppl) and len(set(ppl)) == 6 and all(not r["error"] for r in rows)
    assert all(float(r["merge_s"]) > 0 and float(r["eval_s"]) > 0 for r in rows)
    assert os.path.getsize(os.path.join(out, "results.png")) > 0
    best = rows[ppl.index(min(ppl))]
    with open(os.path.join(out, "best.yml")) as f:
        best_config = yaml.safe_load(f)
    assert "sweep" not in best_config and "eval" not in best_config
    assert [m["parameters"]["weight"] for m in best_config["models"]] == [
        float(best["models.0.parameters.weight"]), float(best["models.1.parameters.weight"])]
    merge_checkpoints(os.path.join(out, "best.yml"), str(tmp_path / "plain"), progress=False)
    saved, plain = load_tensors(str(tmp_path / "best")), load_tensors(str(tmp_path / "plain"))
    assert saved.keys() == plain.keys() and all(torch.equal(saved[k], plain[k]) for k in plain)


def test_evaluated_weights_are_the_bytes_vfuse_merge_writes(llama_family, tmp_path):
    """Every configuration applied in memory — in an order that goes back and forth — equals
    vfuse merge of its plain config, whatever was applied before it."""
    sweep = load_sweep(_grid(tmp_path, llama_family))
    model, _ = load_model(sweep.configurations[0][2].base_model, "cpu")
    memory = _InMemory(model, "cpu")
    expected = {}
    for index in (4, 0, 5, 0):
        config_id, _, config, raw = sweep.configurations[index]
        if config_id not in expected:
            plain = write_yaml(str(tmp_path / f"{config_id}.yml"), yaml.safe_dump(raw))
            merge_checkpoints(plain, str(tmp_path / config_id), progress=False)
            expected[config_id] = load_tensors(str(tmp_path / config_id))
        memory.apply(config)
        state = model.state_dict()
        for name, tensor in expected[config_id].items():
            assert torch.equal(state[name], tensor), (config_id, name)
    assert memory.thresholds  # TIES thresholds kept ...
    assert len(memory.thresholds) == len([n for n in expected["c000"] if "layers" in n or "embed" in n
                                          or "norm" in n or "lm_head" in n])  # ... once per tensor, not per config


def test_perplexity_equals_a_direct_transformers_computation(llama_family, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    base, tuned, text_file = llama_family
    out = str(tmp_path / "out")
    rows = run_sweep(_grid(tmp_path, llama_family), out, progress=False, save_best=str(tmp_path / "best"))
    best = min(rows, key=lambda r: r["perplexity"])
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "best")).eval()
    ids = AutoTokenizer.from_pretrained(base)(TEXT, return_tensors="pt").input_ids
    assert ids.shape[1] <= 128  # one window: the mean loss over every predicted token
    with torch.no_grad():
        direct = torch.exp(model(input_ids=ids, labels=ids).loss).item()
    assert best["perplexity"] == pytest.approx(direct, rel=1e-5)


def test_zip_pairs_the_axes(llama_family, tmp_path):
    text = GRID.replace("[0.3, 0.7]", "[0.3, 0.7, 0.8]").replace("sweep:\n", "sweep:\n  zip: true\n")
    rows = run_sweep(_grid(tmp_path, llama_family, text), str(tmp_path / "out"), progress=False)
    assert [(r["models.0.parameters.weight"], r["models.1.parameters.weight"]) for r in rows] == [
        ("0.3", "0.2"), ("0.7", "0.5"), ("0.8", "0.9")]


def test_resume_after_an_interrupted_sweep(llama_family, tmp_path):
    out = str(tmp_path / "out")
    text = GRID.replace("  perplexity: {text}\n  context_length: 128\n",
                        "  callable: sweep_metrics:interrupt_on_third\n")
    sweep_file = _grid(tmp_path, llama_family, text)
    sweep_metrics.calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep_file, out, progress=False)
    assert [r["config_id"] for r in _read_csv(os.path.join(out, "results.csv"))] == ["c000", "c001"]
    sweep_metrics.calls[:] = ["interrupt"] * 3  # past the third: the resumed run is not interrupted again
    resumed = run_sweep(sweep_file, out, resume=True, progress=False)
    assert sweep_metrics.calls.count("first_logit") == 4  # only c002..c005 evaluated
    assert [r["config_id"] for r in resumed] == [f"c{i:03d}" for i in range(6)]
    sweep_metrics.calls[:] = ["interrupt"] * 3
    fresh = run_sweep(sweep_file, str(tmp_path / "fresh"), progress=False)
    assert [r["first_logit"] for r in resumed] == [r["first_logit"] for r in fresh]


def test_a_failing_metric_is_recorded_and_the_sweep_goes_on(llama_family, tmp_path):
    text = GRID.replace("  perplexity: {text}\n  context_length: 128\n", "  callable: sweep_metrics:fails_every_other\n")
    sweep_metrics.calls.clear()
    rows = run_sweep(_grid(tmp_path, llama_family, text), str(tmp_path / "out"), progress=False)
    assert [bool(r["error"]) for r in rows] == [False, True] * 3
    assert all("metric failed" in r["error"] for r in rows[1::2])
    assert all(isinstance(r["first_logit"], float) for r in rows[::2])


@pytest.mark.parametrize("change,message", [
    (("models.0.parameters.weight: [0.3, 0.7]", "models.7.parameters.weight: [0.3, 0.7]"),
     r"sweep: models.7.parameters.weight: the config has no 7"),
    (("models.0.parameters.weight: [0.3, 0.7]", "models.0.parameters.weight: []"),
     r"sweep.models.0.parameters.weight must be a non-empty list"),
    (("  context_length: 128\n", "  context_length: 128\n  accuracy: mmlu\n"), r"eval.accuracy is not a metric"),
    (("  perplexity: {text}\n", "  callable: no_such_module:f\n"), r"eval.callable='no_such_module:f' cannot be"),
    (("sweep:\n", "sweep:\n  zip: true\n"), r"sweep.zip: true needs every axis to have the same number of values"),
    (("models.1.parameters.weight: [0.2, 0.5, 0.9]", "models.1.parameters.density: [0.5, 1.5]"),
     r"configuration c00\d .*density"),
])
def test_bad_sweep_files_fail_before_any_work(llama_family, tmp_path, change, message):
    out = str(tmp_path / "out")
    with pytest.raises(ConfigError, match=message):
        run_sweep(_grid(tmp_path, llama_family, GRID.replace(*change)), out, progress=False)
    assert not os.path.exists(out)


def test_vlm_merged_with_an_llm_self_attention_only(tmp_path):
    """The seed study's case: a Qwen2-VL base, a Qwen2 LLM merged into its language model's
    self-attention by a loglinear schedule, embeddings kept; the schedule's end swept."""
    vlm = save_state_dict(qwen2_vl(0), str(tmp_path / "vlm"))
    _tokenizer().save_pretrained(vlm)
    llm = save(perturbed(qwen2(0), 7), str(tmp_path / "llm"))
    (tmp_path / "text.txt").write_text(TEXT)
    sweep_file = _sweep_file(tmp_path, f"""
merge_method: task_arithmetic
base_model: {vlm}
models:
  - model: {llm}
    parameters:
      weight:
        - {{filter: self_attn, value: {{schedule: loglinear, start: 0.1, end: 0.5}}}}
        - {{value: 0.0}}
vfuse:
  name_map: {{{llm}: {{"model.": "model.language_model."}}}}
  keep: [{{filter: embed_tokens}}]
sweep:
  models.0.parameters.weight.0.value.end: [0.3, 0.9]
eval:
  perplexity: text.txt
  context_length: 64
  stride: 32
""")
    rows = run_sweep(sweep_file, str(tmp_path / "out"), progress=False)
    assert len(rows) == 2 and rows[0]["perplexity"] != rows[1]["perplexity"]
    sweep = load_sweep(sweep_file)
    model, _ = load_model(vlm, "cpu")
    _InMemory(model, "cpu").apply(sweep.configurations[1][2])
    merge_checkpoints(sweep.configurations[1][2], str(tmp_path / "plain"), progress=False)
    state, plain = model.state_dict(), load_tensors(str(tmp_path / "plain"))
    assert all(torch.equal(state[k], v) for k, v in plain.items())
