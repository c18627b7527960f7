"""The streaming checkpoint merge on real (tiny) checkpoints: parity with mergekit on the
same YAML, schedules and filters, keep rules, VLM↔LLM name maps, in-place merges into a
loaded model, resume after a killed run, and clean failures on bad inputs."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib

import pytest
import torch
from checkpoints import (family, index_of, llama, load_tensors, perturbed, qwen2, qwen2_vl, save, save_state_dict,
                         write_yaml)

import vfuse_kernels as vk
from vfuse_kernels.cli import main as cli_main
from vfuse_kernels.merging import (CheckpointError, ConfigError, build_plan, load_config, merge_checkpoints,
                                   merge_into_, parse_config)
from vfuse_kernels.merging.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def llama_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base, tuned = family(str(root), llama, n=3)
    return root, base, tuned


PARITY_CONFIGS = {
    "linear": """
        merge_method: linear
        models:
          - {model: BASE, parameters: {weight: 0.2}}
          - {model: FT0, parameters: {weight: 0.5}}
          - {model: FT1, parameters: {weight: [0.1, 0.9]}}
        dtype: float32
    """,
    "task_arithmetic": """
        merge_method: task_arithmetic
        base_model: BASE
        models:
          - model: FT0
            parameters:
              weight:
                - {filter: self_attn, value: [0.2, 0.6, 1.0]}
                - {filter: mlp, value: 0.3}
                - {value: 0.5}
          - {model: FT1, parameters: {weight: 0.7}}
          - {model: FT2, parameters: {weight: -0.2}}
        parameters: {lambda: 0.9}
        dtype: float32
    """,
    "ties": """
        merge_method: ties
        base_model: BASE
        models:
          - {model: FT0, parameters: {weight: [0.2, 0.8], density: 0.5}}
          - model: FT1
            parameters:
              weight: [{filter: self_attn, value: 0.3}, {value: 0.6}]
              density: [0.3, 0.9]
          - {model: FT2, parameters: {weight: 0.4}}
        parameters: {normalize: true, density: 0.6, int8_mask: true}
        dtype: float32
    """,
    "ties_l1": """
        merge_method: ties
        base_model: BASE
        models:
          - {model: FT0, parameters: {weight: 1.0, density: 0.4}}
          - {model: FT1, parameters: {weight: 0.5, density: 0.7}}
        parameters: {rescale: true, normalize: false}
        dtype: float32
    """,
}


def task_arithmetic_config(tmp_path, base: str, model: str, weight: float) -> str:
    """A one-model task-arithmetic config file."""
    return write_yaml(str(tmp_path / "c.yml"), f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                                               f"  - {{model: {model}, parameters: {{weight: {weight}}}}}\n")


def _config_text(text, base, tuned):
    text = textwrap.dedent(text)
    text = text.replace("BASE", base)
    for i, t in enumerate(tuned):
        text = text.replace(f"FT{i}", t)
    return text


MERGEKIT_SCRIPT = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
for config_path, out in zip(sys.argv[1::2], sys.argv[2::2]):
    with open(config_path) as f:
        config = MergeConfiguration.model_validate(yaml.safe_load(f))
    run_merge(config, out, options=MergeOptions(write_model_card=False, copy_tokenizer=False))
"""


def test_parity_with_mergekit(llama_family, tmp_path):
    pytest.importorskip("mergekit")
    root, base, tuned = llama_family
    jobs = []
    for name in PARITY_CONFIGS:
        config = write_yaml(str(tmp_path / f"{name}.yml"), _config_text(PARITY_CONFIGS[name], base, tuned))
        jobs += [config, str(tmp_path / f"mergekit-{name}")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", MERGEKIT_SCRIPT, *jobs], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in PARITY_CONFIGS:
        ours = str(tmp_path / f"vfuse-{name}")
        merge_checkpoints(str(tmp_path / f"{name}.yml"), ours, progress=False)
        expected, got = load_tensors(str(tmp_path / f"mergekit-{name}")), load_tensors(ours)
        assert set(got) == set(expected), name
        for key in expected:
            assert got[key].dtype == expected[key].dtype, (name, key)
            torch.testing.assert_close(got[key], expected[key], rtol=2e-6, atol=2e-7, msg=f"{name}: {key}")


def test_output_loads_in_transformers_and_is_sharded(llama_family, tmp_path):
    from transformers import LlamaForCausalLM

    root, base, tuned = llama_family
    config = write_yaml(str(tmp_path / "c.yml"), f"""
merge_method: dare_ties
base_model: {base}
models:
  - {{model: {tuned[0]}, parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: {tuned[1]}, parameters: {{weight: 0.4, density: 0.5}}}}
out_dtype: bfloat16
""")
    out = str(tmp_path / "out")
    summary = merge_checkpoints(config, out, out_shard_size="20KB", progress=False)
    index = index_of(out)
    assert summary.shards == len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in load_tensors(out).values())
    model = LlamaForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert torch.isfinite(logits.float()).all()
    again = str(tmp_path / "again")
    merge_checkpoints(config, again, out_shard_size="20KB", progress=False)
    assert all(torch.equal(load_tensors(out)[k], v) for k, v in load_tensors(again).items())  # DARE is seeded


def test_loglinear_schedule_keep_rule_and_regex_filter(llama_family, tmp_path):
    root, base, tuned = llama_family
    config = write_yaml(str(tmp_path / "c.yml"), f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {tuned[0]}
    parameters:
      weight:
        - {{filter: "re:layers\\\\.\\\\d+\\\\.mlp\\\\.", value: 0.0}}
        - {{value: {{schedule: loglinear, start: 0.1, end: 0.9}}}}
parameters: {{lambda: 1.0}}
vfuse:
  keep:
    - {{filter: embed_tokens}}
    - {{filter: lm_head, model: {tuned[0]}}}
""")
    out = str(tmp_path / "out")
    merge_checkpoints(config, out, progress=False)
    got, b, t0 = load_tensors(out), load_tensors(base), load_tensors(tuned[0])
    assert torch.equal(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], t0["lm_head.weight"])
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    for layer, t in ((0, 0.0), (1, 0.5), (2, 1.0)):
        w = 0.1 * (0.9 / 0.1) ** t  # exp(ln a + (ln b − ln a)·t)
        key = f"model.layers.{layer}.self_attn.q_proj.weight"
        torch.testing.assert_close(got[key].double(), b[key].double() + w * (t0[key].double() - b[key].double()),
                                   rtol=1e-6, atol=1e-7)
    key = "model.norm.weight"  # outside the layers: the schedule's start (t = 0)
    torch.testing.assert_close(got[key].double(), b[key].double() + 0.1 * (t0[key].double() - b[key].double()),
                               rtol=1e-6, atol=1e-7)


def test_vlm_llm_merge_with_name_map(tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    vlm_dir = save_state_dict(qwen2_vl(0), str(tmp_path / "vlm"))  # model.language_model.*, model.visual.*
    llm = qwen2(1)
    llm_dir = save(perturbed(llm, 7), str(tmp_path / "llm"))  # model.*, lm_head
    config = write_yaml(str(tmp_path / "c.yml"), f"""
merge_method: linear
base_model: {vlm_dir}
models:
  - {{model: {vlm_dir}, parameters: {{weight: 0.7}}}}
  - {{model: {llm_dir}, parameters: {{weight: 0.3}}}}
vfuse:
  name_map:
    {llm_dir}: {{"model.": "model.language_model."}}
  keep:
    - {{filter: embed_tokens}}
""")
    out = str(tmp_path / "out")
    summary = merge_checkpoints(config, out, progress=False)
    got, vlm, llm_t = load_tensors(out), load_tensors(vlm_dir), load_tensors(llm_dir)
    assert set(got) == set(vlm)
    visual = [k for k in vlm if ".visual." in k]
    assert visual and all(torch.equal(got[k], vlm[k]) for k in visual)  # only the VLM has them
    assert torch.equal(got["model.language_model.embed_tokens.weight"], vlm["model.language_model.embed_tokens.weight"])
    for out_key, llm_key in (("model.language_model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"),
                             ("lm_head.weight", "lm_head.weight")):
        torch.testing.assert_close(got[out_key], 0.7 * vlm[out_key] + 0.3 * llm_t[llm_key], rtol=1e-6, atol=1e-6)
    assert summary.copied == len(visual) + 1
    model = Qwen2VLForConditionalGeneration.from_pretrained(out)
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.parametrize("staging", [False, True], ids=["views", "staged"])
def test_merge_into_loaded_model_equals_checkpoint_merge(llama_family, tmp_path, staging):
    from transformers import LlamaForCausalLM

    root, base, tuned = llama_family
    config = write_yaml(str(tmp_path / "c.yml"), f"""
merge_method: ties
base_model: {base}
models:
  - {{model: {tuned[0]}, parameters: {{weight: 0.7, density: 0.4}}}}
  - {{model: {tuned[1]}, parameters: {{weight: 0.5, density: 0.4}}}}
""")
    merge_checkpoints(config, str(tmp_path / "out"), progress=False)
    model = LlamaForCausalLM.from_pretrained(base)
    counts = merge_into_(model, tuned[:2], [0.7, 0.5], method="ties", density=0.4, staging=staging)
    assert counts["merged"] == len(load_tensors(base))
    expected = load_tensors(str(tmp_path / "out"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("staging", [False, True], ids=["views", "staged"])
def test_resume_after_failure_keeps_finished_shards(llama_family, tmp_path, monkeypatch, staging):
    from vfuse_kernels.merging import engine

    root, base, tuned = llama_family
    config = task_arithmetic_config(tmp_path, base, tuned[0], 0.5)
    reference = str(tmp_path / "reference")
    merge_checkpoints(config, reference, out_shard_size="20KB", progress=False)
    original = engine._Runner.compute
    calls = {"n": 0}

    def failing(self, task, loaded, offset):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("disk on fire")
        return original(self, task, loaded, offset)

    monkeypatch.setattr(engine._Runner, "compute", failing)
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge_checkpoints(config, out, out_shard_size="20KB", progress=False, staging=staging)
    monkeypatch.setattr(engine._Runner, "compute", original)
    assert not os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert not any(f.endswith(".tmp") for f in os.listdir(out))
    finished = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert finished
    summary = merge_checkpoints(config, out, out_shard_size="20KB", resume=True, progress=False, staging=staging)
    assert summary.skipped > 0
    assert index_of(out)["weight_map"] == index_of(reference)["weight_map"]
    assert all(torch.equal(v, load_tensors(reference)[k]) for k, v in load_tensors(out).items())


def test_the_last_shard_gets_no_crc_and_a_resume_rewrites_it(llama_family, tmp_path, monkeypatch):
    """Every shard but the run's last is recorded with its CRC-32; a run stopped while
    publishing keeps those for resume and rewrites the last one, giving a plain run's bytes."""
    from vfuse_kernels.merging import engine
    from vfuse_kernels.merging.checkpoint import file_crc32

    root, base, tuned = llama_family
    config = task_arithmetic_config(tmp_path, base, tuned[0], 0.5)
    reference = str(tmp_path / "reference")
    merge_checkpoints(config, reference, out_shard_size="20KB", progress=False)
    shards = sorted(set(index_of(reference)["weight_map"].values()))
    assert len(shards) >= 3

    def publishing_fails(*args):
        raise OSError(errno.EIO, "Input/output error", "config.json")

    monkeypatch.setattr(engine, "_finish_out_dir", publishing_fails)
    out = str(tmp_path / "out")
    with pytest.raises(engine.MergeStopped, match="Input/output error"):
        merge_checkpoints(config, out, out_shard_size="20KB", progress=False)
    monkeypatch.undo()
    with open(os.path.join(out, engine.STATE_NAME)) as f:
        recorded = json.load(f)["shards"]
    assert sorted(recorded) == shards[:-1]
    assert all(file_crc32(os.path.join(out, name)) == digest for name, digest in recorded.items())
    summary = merge_checkpoints(config, out, out_shard_size="20KB", resume=True, progress=False)
    assert summary.skipped == sum(f != shards[-1] for f in index_of(reference)["weight_map"].values())
    for name in shards:
        assert file_crc32(os.path.join(out, name)) == file_crc32(os.path.join(reference, name)), name


def test_a_largest_output_waits_for_the_previous_ones_write(tmp_path, monkeypatch):
    """Peak memory: an output is computed only once the outputs still waiting for the writer leave
    room for it within WRITE_AHEAD_BYTES (here the largest output's size) — lm_head's and the
    embeddings' (adjacent in the file) share one pooled buffer even when the writer is slow — and
    the bytes are those of a plain run."""
    from vfuse_kernels.merging import engine
    from vfuse_kernels.merging.checkpoint import ShardWriter

    base = save_state_dict(llama(0), str(tmp_path / "base"))  # one file: lm_head, then the embeddings
    tuned = save_state_dict(perturbed(llama(0), 7), str(tmp_path / "ft"))
    config = task_arithmetic_config(tmp_path, base, tuned, 0.5)
    infos = list(Checkpoint(base).tensors.values())
    largest = max(info.nbytes for info in infos)
    assert [info.nbytes == largest for info in sorted(infos, key=lambda i: i.offset)][:2] == [True, True]
    reference = str(tmp_path / "reference")
    merge_checkpoints(config, reference, progress=False)
    fresh = []
    take, write = engine._BufferPool.take, ShardWriter.write

    def recording_take(self, nbytes, offset):
        fresh.append(nbytes == largest and not self._idle.get(nbytes))
        return take(self, nbytes, offset)

    def slow_write(self, name, data):
        if data.nbytes == largest:
            time.sleep(0.3)  # the next largest output is ready to be computed meanwhile
        return write(self, name, data)

    monkeypatch.setattr(engine._BufferPool, "take", recording_take)
    monkeypatch.setattr(ShardWriter, "write", slow_write)
    monkeypatch.setattr(engine, "WRITE_AHEAD_BYTES", largest)
    out = str(tmp_path / "out")
    merge_checkpoints(config, out, progress=False)
    assert sum(fresh) == 1
    assert all(torch.equal(v, load_tensors(reference)[k]) for k, v in load_tensors(out).items())


KILL_SCRIPT = """
import sys, time
from vfuse_kernels.merging import engine
original = engine._Runner.compute
def slow(self, task, loaded, offset):
    time.sleep(0.05)
    return original(self, task, loaded, offset)
engine._Runner.compute = slow
engine.merge_checkpoints(sys.argv[1], sys.argv[2], out_shard_size="20KB", progress=False)
"""


def test_killed_run_is_not_complete_and_resumes(llama_family, tmp_path):
    root, base, tuned = llama_family
    config = task_arithmetic_config(tmp_path, base, tuned[1], 0.3)
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, config, out])
    state = os.path.join(out, ".vfuse-merge-state.json")
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(state):
            with open(state) as f:
                try:
                    if json.load(f)["shards"]:
                        break
                except ValueError:
                    pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    summary = merge_checkpoints(config, out, out_shard_size="20KB", resume=True, progress=False)
    assert summary.skipped > 0
    reference = str(tmp_path / "reference")
    merge_checkpoints(config, reference, out_shard_size="20KB", progress=False)
    assert all(torch.equal(v, load_tensors(reference)[k]) for k, v in load_tensors(out).items())


def _rewrite(path, drop=None, reshape=None):
    """Rewrites the single-file checkpoint copy at path without/with a changed tensor."""
    from safetensors.torch import save_file

    tensors = load_tensors(path)
    for f in os.listdir(path):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(path, f))
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = tensors[reshape][:-1].clone()
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("damage,message", [
    ("missing", "has no tensor 'model.layers.1.mlp.up_proj.weight'"),
    ("shape", r"has shape \(36, 32\), the base has \(37, 32\)"),
    ("truncated", "truncated"),
    ("extra", "has tensor 'extra.weight' that"),
])
def test_bad_checkpoints_fail_before_any_output(llama_family, tmp_path, damage, message):
    from safetensors.torch import save_file

    root, base, tuned = llama_family
    bad = str(tmp_path / "bad")
    shutil.copytree(tuned[0], bad)
    if damage == "missing":
        _rewrite(bad, drop="model.layers.1.mlp.up_proj.weight")
    elif damage == "shape":
        _rewrite(bad, reshape="model.layers.1.mlp.up_proj.weight")
    elif damage == "truncated":
        shard = sorted(f for f in os.listdir(bad) if f.endswith(".safetensors"))[-1]
        with open(os.path.join(bad, shard), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(bad, shard)) - 10)
    else:
        tensors = load_tensors(bad)
        tensors["extra.weight"] = torch.ones(3)
        _rewrite(bad)
        save_file(tensors, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    config = task_arithmetic_config(tmp_path, base, bad, 0.5)
    out = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match=message):
        merge_checkpoints(config, out, progress=False)
    assert not os.path.exists(out)


@pytest.mark.parametrize("text,message", [
    ("merge_method: frobnicate", "merge_method='frobnicate' is not supported"),
    ("merge_method: ties\nmodels: [{model: FT0}]", "base_model is required"),
    ("merge_method: ties\nbase_model: BASE\nmodels: [{model: FT0}]", r"models\[0\] .* has no weight"),
    ("merge_method: ties\nbase_model: BASE\nslices: []\nmodels: [{model: FT0}]", "give exactly one of models and slices"),
    ("merge_method: ties\nbase_model: BASE\nmodels: [{model: FT0}]\ntokenizer: {source: union}",
     "unsupported key 'tokenizer'"),
    ("merge_method: ties\nbase_model: BASE\nmodels: [{model: FT0, parameters: {weight: 1}}]\ntokenizer_source: union",
     "tokenizer_source='union' is not supported"),
    ("merge_method: ties\nbase_model: BASE\nmodels: [{model: FT0, parameters: {weight: 1, epsilon: 0.1}}]",
     r"models\[0\].parameters.epsilon is not a parameter of ties"),
    ("merge_method: linear\nmodels: [{model: FT0, parameters: {weight: 1, density: 0.5}}]",
     "density is not a parameter of linear"),
    ("merge_method: ties\nbase_model: BASE\nmodels: [{model: FT0, parameters: {weight: 1}}]\ndtype: float8",
     "dtype='float8'"),
    ("merge_method: ties\nbase_model: BASE\nmodels: [{model: missing/path, parameters: {weight: 1}}]",
     "no such checkpoint"),
    ("merge_method: ties\nbase_model: BASE\nmodels: [{model: FT0, parameters: {weight: {schedule: cubic}}}]",
     "schedule='cubic'"),
    ("merge_method: ties\nbase_model: BASE\nmodels: [{model: FT0, parameters: {weight: 1}}]\nvfuse: {color: red}",
     "vfuse.color is not a vfuse option"),
])
def test_config_errors_name_the_key(llama_family, tmp_path, text, message):
    root, base, tuned = llama_family
    path = write_yaml(str(tmp_path / "c.yml"), text.replace("BASE", base).replace("FT0", tuned[0]))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_density_out_of_range_is_reported_before_work(llama_family, tmp_path):
    root, base, tuned = llama_family
    with pytest.raises(ConfigError, match=r"models\[0\].parameters.density=1.5: a density must be in \(0, 1\]"):
        parse_config({"merge_method": "ties", "base_model": base,
                      "models": [{"model": tuned[0], "parameters": {"weight": 1, "density": [0.5, 1.5]}}]})


def test_cli_merge_prints_summary_and_refuses_to_overwrite(llama_family, tmp_path, capsys):
    root, base, tuned = llama_family
    config = task_arithmetic_config(tmp_path, base, tuned[0], 0.5)
    out = str(tmp_path / "out")
    assert cli_main(["merge", config, out, "--threads", "1", "--out-shard-size", "30KB"]) == 0
    captured = capsys.readouterr()
    assert "merged 30 tensors" in captured.out and "GB/s" in captured.out
    assert "vfuse merge" in captured.err  # the progress bar
    assert cli_main(["merge", config, out, "--quiet"]) == 2
    assert "already holds a complete merge" in capsys.readouterr().err


def test_checkpoint_reads_match_safetensors(llama_family):
    root, base, tuned = llama_family
    expected = load_tensors(base)
    with Checkpoint(base) as ck:
        assert set(ck.tensors) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(ck.read(name), tensor)


def test_linear_merge_of_deltas_api(llama_family):
    """The engine's linear path (zero base, the tuned tensors as deltas) is the weighted average."""
    root, base, tuned = llama_family
    a, b = load_tensors(tuned[0]), load_tensors(tuned[1])
    key = "model.layers.0.mlp.gate_proj.weight"
    out = vk.delta_merge(torch.zeros_like(a[key]), [a[key], b[key]], [1.0, 3.0], method="linear",
                         tuned_are_deltas=True)
    torch.testing.assert_close(out, (a[key] + 3 * b[key]) / 4, rtol=1e-6, atol=1e-7)


# --- the staged route (device engine and merge_into_ on an accelerator), run with CPU tensors here


STAGED_CONFIGS = {  # every kind of task: merges with a base, a zero base (linear), copies, dtype conversions
    "ties": PARITY_CONFIGS["ties"],
    "linear_bf16": PARITY_CONFIGS["linear"].replace("dtype: float32", "out_dtype: bfloat16"),
    "dare_ties_keep": """
        merge_method: dare_ties
        base_model: BASE
        models:
          - {model: FT0, parameters: {weight: 0.6, density: 0.5}}
          - {model: FT1, parameters: {weight: 0.4, density: 0.7}}
        out_dtype: float16
        vfuse: {seed: 5, keep: [{filter: embed_tokens}, {filter: lm_head, model: FT1}]}
    """,
}


@pytest.mark.parametrize("name", list(STAGED_CONFIGS))
def test_staged_route_writes_the_same_bytes(llama_family, tmp_path, monkeypatch, name):
    """Small staging buffers (chunks that split elements, a ring that wraps many times) and
    the direct CPU route give byte-identical shards."""
    from functools import partial

    from vfuse_kernels.merging import checkpoint, engine

    root, base, tuned = llama_family
    config = write_yaml(str(tmp_path / "c.yml"), _config_text(STAGED_CONFIGS[name], base, tuned))
    merge_checkpoints(config, str(tmp_path / "direct"), out_shard_size="20KB", progress=False)
    monkeypatch.setattr(checkpoint, "STAGING_BYTES", 1001)
    monkeypatch.setattr(engine, "DeviceReader", partial(engine.DeviceReader, slots=3, threads=2))
    monkeypatch.setattr(engine, "_DeviceToFile", partial(engine._DeviceToFile, slots=2))
    summary = merge_checkpoints(config, str(tmp_path / "staged"), out_shard_size="20KB", progress=False,
                                staging=True)
    assert summary.shards > 1
    names = sorted(os.listdir(tmp_path / "direct"))
    assert names == sorted(os.listdir(tmp_path / "staged"))
    for file in names:
        assert (tmp_path / "direct" / file).read_bytes() == (tmp_path / "staged" / file).read_bytes(), file


def test_device_reader_reads_in_chunks(tmp_path):
    """Awkward sizes (empty, one byte, a 16-byte chunk ± 1, many chunks) through two 16-byte
    buffers and 3 threads."""
    from safetensors.torch import save_file

    from vfuse_kernels.merging.checkpoint import DeviceReader

    gen = torch.Generator().manual_seed(0)
    def raw(n):
        return torch.randint(0, 255, (n,), dtype=torch.uint8, generator=gen)

    tensors = {"empty": torch.empty(0, 3), "one": raw(1), "below": raw(15), "chunk": torch.randn(4, generator=gen),
               "above": raw(17), "half": torch.randn(9, generator=gen).half(),
               "many": torch.randn(37, 5, generator=gen).bfloat16()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with Checkpoint(str(tmp_path)) as ck:
        reader = DeviceReader(torch.device("cpu"), slots=2, slot_bytes=16, threads=3)
        try:
            loads = [(name, reader.submit([(ck, name), (ck, "many")])) for name in tensors]
            for name, load in loads:
                got, many = load.result()
                assert got.dtype == tensors[name].dtype and torch.equal(got, tensors[name]), name
                assert torch.equal(many, tensors["many"])
        finally:
            reader.close()


def test_staged_read_errors_name_the_file(llama_family, tmp_path):
    from vfuse_kernels.merging.checkpoint import DeviceReader

    root, base, tuned = llama_family
    copy = str(tmp_path / "ft")
    shutil.copytree(tuned[0], copy)
    with Checkpoint(copy) as ck:
        name = max(ck.tensors, key=lambda n: ck.tensors[n].offset)
        info = ck.tensors[name]
        os.truncate(info.file, info.offset + info.nbytes // 2)  # shrunk after the header was read
        reader = DeviceReader(torch.device("cpu"), slot_bytes=64)
        try:
            with pytest.raises(CheckpointError, match=f"{os.path.basename(info.file)}: unexpected end of file"):
                reader.submit([(ck, name)]).result()
        finally:
            reader.close()
        with pytest.raises(ValueError, match="outside tensor"):
            ck.read_bytes(name, torch.empty(8, dtype=torch.uint8), info.nbytes - 4)


def test_crc32_is_zlibs():
    """The extension's CRC-32 (PCLMULQDQ folding over 64- and 16-byte blocks, then bytes) equals
    zlib.crc32 at every length around the block sizes, from any alignment, chained."""
    from vfuse_kernels._backend import cpu_extension

    data = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    raw = memoryview(data.numpy())
    ext = cpu_extension()
    for offset in (0, 1, 7, 13):
        for n in (*range(0, 200), 1023, 4096 + 5, (1 << 20) - 13):
            piece = raw[offset:offset + n]
            assert ext.crc32(piece, 0) == zlib.crc32(piece), (offset, n)
    running = 0x12345678
    for start, end in ((0, 100), (100, 65), (65, 70000), (70000, 1 << 20)):
        piece = raw[min(start, end):max(start, end)]
        assert ext.crc32(piece, running) == zlib.crc32(piece, running)
        running = zlib.crc32(piece, running)
    assert ext.crc32(b"", 7) == 7 and ext.crc32(b"vfuse", 0) == zlib.crc32(b"vfuse")


@pytest.mark.parametrize("crc_thread_bytes", [None, 100], ids=["inline-crc", "crc-thread"])
@pytest.mark.parametrize("direct_io", ["0", "1"], ids=["direct-io", "page-cache"])
def test_shard_writer_digest_and_bytes(tmp_path, monkeypatch, crc_thread_bytes, direct_io):
    """The CRC-32 finish() returns is the file's, with the CRC on a helper thread, and with the
    data sent to disk directly or from the page cache in small steps; the shard reads back as
    written."""
    from safetensors.torch import load_file

    from vfuse_kernels.merging import checkpoint, output
    from vfuse_kernels.merging.checkpoint import ShardWriter, dtype_name, file_crc32, plan_shards

    monkeypatch.setattr(checkpoint, "CRC_THREAD_BYTES", crc_thread_bytes)
    monkeypatch.setattr(output, "WRITEBACK_BYTES", 1000)
    monkeypatch.setenv("VFUSE_NO_DIRECT_IO", direct_io)
    gen = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(33, 7, generator=gen), "b": torch.randn(0, 4, generator=gen).half(),
               "c": torch.randn(301, generator=gen).bfloat16(), "d": torch.randn(5, generator=gen)}
    (layout,) = plan_shards([(k, dtype_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()], 1 << 30)
    writer = ShardWriter(str(tmp_path), layout)
    for name in layout.names:
        writer.write(name, tensors[name])
    digest = writer.finish()
    path = str(tmp_path / layout.filename)
    assert digest == file_crc32(path) and os.path.getsize(path) == layout.size
    with open(path, "rb") as f:
        assert digest == f"{zlib.crc32(f.read()):08x}"  # zlib's CRC-32: state files check under either
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    unchecked = tmp_path / "unchecked"
    unchecked.mkdir()
    writer = ShardWriter(str(unchecked), layout, checksum=False)
    for name in layout.names:
        writer.write(name, tensors[name])
    assert writer.finish() is None and file_crc32(str(unchecked / layout.filename)) == digest


def test_merge_into_checks_every_shape_before_changing_the_model(llama_family, tmp_path):
    from transformers import LlamaForCausalLM

    root, base, tuned = llama_family
    bad = str(tmp_path / "bad")
    shutil.copytree(tuned[0], bad)
    _rewrite(bad, reshape="model.layers.2.mlp.up_proj.weight")  # late in the model's order
    model = LlamaForCausalLM.from_pretrained(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"'model.layers.2.mlp.up_proj.weight' has shape \(36, 32\)"):
        merge_into_(model, [tuned[1], bad], 0.5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="a list of checkpoints"):
        merge_into_(model, tuned[0], 0.5)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("method", ["ties", "dare_ties_keep"])
def test_cuda_engine_writes_the_cpu_bytes(llama_family, tmp_path, method):
    root, base, tuned = llama_family
    config = write_yaml(str(tmp_path / "c.yml"), _config_text(STAGED_CONFIGS[method], base, tuned))
    merge_checkpoints(config, str(tmp_path / "cpu"), out_shard_size="20KB", progress=False)
    merge_checkpoints(config, str(tmp_path / "cuda"), device="cuda", out_shard_size="20KB", progress=False)
    names = sorted(os.listdir(tmp_path / "cpu"))
    assert names == sorted(os.listdir(tmp_path / "cuda"))
    for file in names:
        assert (tmp_path / "cpu" / file).read_bytes() == (tmp_path / "cuda" / file).read_bytes(), file


@cuda
def test_cuda_merge_into_on_a_side_stream_equals_cpu(llama_family):
    from transformers import LlamaForCausalLM

    root, base, tuned = llama_family
    on_cpu = LlamaForCausalLM.from_pretrained(base)
    merge_into_(on_cpu, tuned, [0.5, 0.3, 0.2], method="ties", density=0.5)
    on_gpu = LlamaForCausalLM.from_pretrained(base).cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the merge runs on the caller's current stream
        merge_into_(on_gpu, tuned, [0.5, 0.3, 0.2], method="ties", density=0.5)
        got = {k: v.cpu() for k, v in on_gpu.state_dict().items()}
    for name, tensor in on_cpu.state_dict().items():
        assert torch.equal(got[name], tensor), name


def test_engine_bench_quick_produces_every_name(monkeypatch):
    from vfuse_kernels.bench import engine as bench_engine

    monkeypatch.delenv("VFUSE_BACKEND", raising=False)
    result = bench_engine.gpu_suite(torch.device("cpu"), quick=True)
    names = {c["name"] for c in result["checks"]}
    assert names == {template.format(method=m) for template in bench_engine.CHECKS.values()
                     for m in bench_engine.METHODS}
    assert all(c["passed"] for c in result["checks"]), result["checks"]
    assert [(t["area"], t["name"]) for t in result["targets"]] == [("merge", n) for n in bench_engine.TARGETS]
    for t in result["targets"]:
        assert t["value"] > 0 and t["met"] == (t["value"] >= bench_engine.TARGETS[t["name"]])
    ops = {(r["op"], r.get("method")) for r in result["rows"]}
    assert {("vfuse merge", m) for m in bench_engine.METHODS} <= ops
    assert {("merge_into_", m) for m in bench_engine.METHODS} <= ops
    for r in result["rows"]:
        assert r["suite"] == "engine" and r["median_ms"] > 0 and r["impl"]


NATIVE_CASES = {  # config (models BASE, FT0, FT1), the family's dtype, which merges run native: all, some, none
    "task_arithmetic": ("base_model: BASE\nparameters: {lambda: 0.9}\nmodels:\n  - {model: FT0, parameters: {weight: 0.7}}\n"
                        "  - {model: FT1, parameters: {weight: -0.4}}\n", torch.bfloat16, "all"),
    "task_arithmetic-to-bf16": ("base_model: BASE\nmodels:\n  - {model: FT0, parameters: {weight: 0.7}}\n"
                                "out_dtype: bfloat16\n", torch.float32, "all"),
    "linear-to-fp32": ("models:\n  - {model: BASE, parameters: {weight: 0.2}}\n  - {model: FT0, parameters: {weight: 0.7}}\n"
                       "  - {model: FT1, parameters: {weight: 0.4}}\nout_dtype: float32\n", torch.float16, "all"),
    "ties": ("base_model: BASE\nmodels:\n  - {model: FT0, parameters: {weight: 0.7, density: 0.3}}\n"
             "  - {model: FT1, parameters: {weight: 0.4, density: 0.8}}\n", torch.bfloat16, "all"),
    "ties-l1-to-fp32": ("base_model: BASE\nparameters: {rescale: true, normalize: false}\nmodels:\n"
                        "  - {model: FT0, parameters: {weight: 0.7, density: 0.1}}\n"
                        "  - {model: FT1, parameters: {weight: -0.4, density: 1.0}}\nout_dtype: float32\n",
                        torch.float16, "all"),
    "dare_ties": ("base_model: BASE\nparameters: {lambda: 0.8}\nmodels:\n"
                  "  - {model: FT0, parameters: {weight: 0.7, density: 0.5}}\n"
                  "  - {model: FT1, parameters: {weight: 0.4, density: 0.2}}\n", torch.float32, "all"),
    "dare_linear-no_rescale": ("base_model: BASE\nparameters: {rescale: false}\nmodels:\n"
                               "  - {model: FT0, parameters: {weight: 0.7, density: 0.5}}\n", torch.bfloat16, "all"),
    "breadcrumbs": ("base_model: BASE\nmodels:\n  - {model: FT0, parameters: {weight: 0.7, density: 0.4, gamma: 0.05}}\n"
                    "  - {model: FT1, parameters: {weight: 0.4, density: 0.9, gamma: 0.02}}\n", torch.bfloat16, "all"),
    "breadcrumbs_ties-l1-to-fp32": ("base_model: BASE\nparameters: {rescale: true, lambda: 0.9}\nmodels:\n"
                                    "  - {model: FT0, parameters: {weight: 0.7, density: 1.0, gamma: 0.1}}\n"
                                    "  - {model: FT1, parameters: {weight: 0.4, density: 0.3}}\nout_dtype: float32\n",
                                    torch.float16, "all"),
    "breadcrumbs-normalized": ("base_model: BASE\nparameters: {normalize: true}\nmodels:\n"
                               "  - {model: FT0, parameters: {weight: 0.7, density: 0.4}}\n", torch.bfloat16,
                               "none"),  # a normalised sum without consensus: gta's torch combine
    "nearswap": ("base_model: BASE\nparameters: {t: 0.002}\nmodels:\n  - {model: BASE}\n  - {model: FT0}\n"
                 "out_dtype: float16\n", torch.bfloat16, "all"),
    "slerp": ("base_model: BASE\nparameters: {t: [0, 0.3, 1]}\nmodels:\n  - {model: BASE}\n  - {model: FT0}\n",
              torch.float32, "all"),
    "slerp-to-fp16": ("base_model: BASE\nparameters: {t: 0.6}\nmodels:\n  - {model: BASE}\n  - {model: FT0}\n"
                      "out_dtype: float16\n", torch.bfloat16, "none"),  # the op rounds through bf16
    "model_stock": ("base_model: BASE\nmodels:\n  - {model: FT0}\n  - {model: FT1}\n", torch.bfloat16, "all"),
    "nuslerp": ("base_model: BASE\nmodels:\n  - {model: FT0, parameters: {weight: 0.3}}\n"
                "  - {model: FT1, parameters: {weight: 0.9}}\n", torch.bfloat16, "all"),
    "nuslerp-row_wise": ("base_model: BASE\nparameters: {nuslerp_flatten: false}\nmodels:\n"
                         "  - {model: FT0, parameters: {weight: 0.3}}\n  - {model: FT1, parameters: {weight: 0.9}}\n",
                         torch.bfloat16, "none"),  # vector by vector: torch ops
    "multislerp": ("base_model: BASE\nmodels:\n  - {model: FT0, parameters: {weight: 0.3}}\n"
                   "  - {model: FT1, parameters: {weight: [0.2, 0.9]}}\nout_dtype: float32\n", torch.float16, "all"),
    "karcher": ("models:\n  - {model: BASE}\n  - {model: FT0}\n  - {model: FT1}\nparameters: {max_iter: 5}\n",
                torch.bfloat16, "all"),
    "karcher-tol": ("models:\n  - {model: BASE}\n  - {model: FT0}\nparameters: {tol: 1.0e+6}\n",
                    torch.float32, "none"),  # every norm below tol: the C++ path hands over to torch
    "model_stock-filter_wise": ("base_model: BASE\nparameters: {filter_wise: true}\nmodels:\n  - {model: FT0}\n"
                                "  - {model: FT1}\n", torch.float16, "some"),  # 1-D tensors native, the rest torch
}


def native_case(tmp_path, case: str) -> tuple[str, str]:
    """(config path, which merges run native) of NATIVE_CASES[case] over a fresh test family."""
    text, dtype, native_share = NATIVE_CASES[case]
    base, tuned = family(str(tmp_path), llama, n=2, dtype=dtype)
    text = text.replace("BASE", base).replace("FT0", tuned[0]).replace("FT1", tuned[1])
    return write_yaml(str(tmp_path / "c.yml"), f"merge_method: {case.split('-')[0]}\n{text}"), native_share


def assert_same_bits(out_a: str, out_b: str) -> None:
    """The two merge outputs hold the same tensors, bit for bit (NaNs too)."""
    a, b = load_tensors(out_a), load_tensors(out_b)
    assert a.keys() == b.keys() and len(a) > 5
    for name, value in a.items():
        assert torch.equal(value.view(torch.uint8), b[name].view(torch.uint8)), name


@pytest.mark.parametrize("case", NATIVE_CASES)
def test_the_torch_free_merge_writes_the_torch_routes_bytes(tmp_path, monkeypatch, case):
    """Task arithmetic, linear, TIES, DARE, breadcrumbs and the C++-backed per-tensor methods run
    on the CPU on the files' pages without torch (merging/native.py); the torch route (the ops on views of the
    same memory) writes the same bits, with dtype conversions on the way out too; what the
    native route does not take (a rounding the op does differently, per-vector work, a case
    the op sends to torch ops) goes through torch."""
    from vfuse_kernels import selection
    from vfuse_kernels.merging import engine

    monkeypatch.setattr(selection, "SMALL", 512)  # TIES: sampled brackets on the family's small tensors too
    config, native_share = native_case(tmp_path, case)
    calls, native = [], engine.native_merge

    def recording(plan, task, *args):
        done = native(plan, task, *args)
        calls.extend([task] * done)
        return done

    monkeypatch.setattr(engine, "native_merge", recording)
    merge_checkpoints(config, str(tmp_path / "native"), progress=False)
    tasks = build_plan(load_config(config)).tasks
    assert {"all": len(calls) == len(tasks), "some": 0 < len(calls) < len(tasks), "none": not calls}[native_share]
    monkeypatch.setattr(engine, "kernel_takes", lambda *args: False)
    merge_checkpoints(config, str(tmp_path / "torch"), progress=False)
    assert_same_bits(str(tmp_path / "native"), str(tmp_path / "torch"))


@pytest.mark.parametrize("case", ["task_arithmetic", "linear-to-fp32", "ties", "ties-l1-to-fp32", "dare_ties",
                                  "breadcrumbs", "breadcrumbs_ties-l1-to-fp32"])
def test_outputs_merged_and_written_in_parts_are_the_whole_merges_bytes(tmp_path, monkeypatch, case):
    """A host merge whose last pass goes element by element writes outputs over PART_BYTES in parts
    (each merged into a pool buffer, DARE's random bits and TIES's tie cutoffs by flat index):
    the bytes of the merge run whole, with a slow writer so that parts wait for it."""
    from vfuse_kernels import selection
    from vfuse_kernels.merging import engine
    from vfuse_kernels.merging.checkpoint import ShardWriter

    monkeypatch.setattr(selection, "SMALL", 512)
    config, _ = native_case(tmp_path, case)
    merge_checkpoints(config, str(tmp_path / "whole"), progress=False)
    parts, append = [], ShardWriter.append

    def slow_append(self, data):
        parts.append(memoryview(data).nbytes)
        time.sleep(0.001)
        return append(self, data)

    part_bytes = 2048  # 512 or 1024 elements: several parts in most of the family's tensors
    monkeypatch.setattr(engine, "PART_BYTES", part_bytes)
    monkeypatch.setattr(engine, "WRITE_AHEAD_BYTES", 4 * part_bytes)
    monkeypatch.setattr(ShardWriter, "append", slow_append)
    merge_checkpoints(config, str(tmp_path / "parts"), progress=False)
    assert parts.count(part_bytes) >= 10
    assert_same_bits(str(tmp_path / "whole"), str(tmp_path / "parts"))


def test_the_merge_kernel_takes_ranges_at_its_alignment():
    """``_C.merge``'s ``first``: a multiple of MERGE_ALIGN, and the range within the tensors."""
    from vfuse_kernels._extension import cpu_extension

    ext = cpu_extension()
    if ext is None:
        pytest.skip("the C++ extension is not built")
    base, tuned, out = torch.randn(2000), torch.randn(2000), torch.empty(2000)
    args = (out.data_ptr(), 0, base.data_ptr(), 0, [tuned.data_ptr()], [0], 2000, False, 0, [0], [0], 0, [0.5],
            [0.5], 0, False, 1.0)
    ext.merge(*args, first=ext.MERGE_ALIGN, count=2000 - ext.MERGE_ALIGN)
    expected = (base + 0.5 * (tuned - base))[ext.MERGE_ALIGN:]
    torch.testing.assert_close(out[:2000 - ext.MERGE_ALIGN], expected, rtol=1e-6, atol=1e-6)
    for first, count in [(1, 10), (ext.MERGE_ALIGN, 2000), (-ext.MERGE_ALIGN, 10), (4 * ext.MERGE_ALIGN, -1)]:
        with pytest.raises(ValueError, match="multiple of"):
            ext.merge(*args, first=first, count=count)
