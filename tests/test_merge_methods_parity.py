"""``vfuse merge`` against ``mergekit-yaml`` (mergekit itself, run in a subprocess) on the same
YAML for mergekit's per-tensor methods and ``slices:``, on real tiny multi-shard Llama
checkpoints; and the configs mergekit's methods refuse, refused before anything is written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from checkpoints import family, llama, load_tensors, write_yaml

from vfuse_kernels.merging import ConfigError, load_config, merge_checkpoints, merge_into_

MERGEKIT_SCRIPT = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
for config_path, out in zip(sys.argv[1::2], sys.argv[2::2]):
    with open(config_path) as f:
        config = MergeConfiguration.model_validate(yaml.safe_load(f))
    run_merge(config, out, options=MergeOptions(write_model_card=False, copy_tokenizer=False))
"""

CONFIGS = {
    # a frankenmerge: overlapping layer ranges of two models stacked into 5 layers
    "passthrough_slices": """
        merge_method: passthrough
        slices:
          - sources: [{model: BASE, layer_range: [0, 2]}]
          - sources: [{model: FT0, layer_range: [1, 3], parameters: {scale: 0.5}}]
          - sources: [{model: FT1, layer_range: [2, 3]}]
        dtype: float32
    """,
    "ties_slices": """
        merge_method: ties
        base_model: BASE
        slices:
          - sources:
              - {model: BASE, layer_range: [0, 2]}
              - {model: FT0, layer_range: [0, 2], parameters: {weight: [0.2, 0.8], density: 0.5}}
              - {model: FT1, layer_range: [1, 3], parameters: {weight: 0.6}}
            parameters: {density: 0.7}
          - sources:
              - {model: BASE, layer_range: [2, 3]}
              - {model: FT0, layer_range: [2, 3], parameters: {weight: 0.3, density: 0.9}}
              - {model: FT1, layer_range: [0, 1], parameters: {weight: 0.5, density: 0.4}}
        parameters: {normalize: true}
        dtype: float32
    """,
    "slerp": """
        merge_method: slerp
        base_model: BASE
        models: [{model: BASE}, {model: FT0}]
        parameters:
          t:
            - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
            - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
            - {value: 0.5}
        dtype: float32
    """,
    "nuslerp": """
        merge_method: nuslerp
        base_model: BASE
        models:
          - {model: FT0, parameters: {weight: 0.3}}
          - {model: FT1, parameters: {weight: [0.2, 0.9]}}
        parameters: {nuslerp_flatten: false}
        dtype: float32
    """,
    "multislerp": """
        merge_method: multislerp
        models:
          - {model: FT0, parameters: {weight: 0.5}}
          - {model: FT1, parameters: {weight: 0.3}}
          - {model: FT2, parameters: {weight: 0.2}}
        dtype: float32
    """,
    "nearswap": """
        merge_method: nearswap
        base_model: BASE
        models: [{model: BASE}, {model: FT0}]
        parameters: {t: 0.01}
        dtype: float32
    """,
    "karcher": """
        merge_method: karcher
        models: [{model: FT0}, {model: FT1}, {model: FT2}]
        parameters: {max_iter: 20}
        dtype: float32
    """,
    "breadcrumbs": """
        merge_method: breadcrumbs
        base_model: BASE
        models:
          - {model: FT0, parameters: {weight: [0.3, 0.9], density: 0.6, gamma: 0.05}}
          - {model: FT1, parameters: {weight: 0.5, density: 0.8}}
        parameters: {gamma: 0.02}
        dtype: float32
    """,
    "breadcrumbs_ties": """
        merge_method: breadcrumbs_ties
        base_model: BASE
        models:
          - {model: FT0, parameters: {weight: 0.7, density: 0.5, gamma: 0.1}}
          - {model: FT1, parameters: {weight: 0.4, density: 0.7, gamma: 0.01}}
          - {model: FT2, parameters: {weight: [{filter: mlp, value: 0.2}, {value: 0.6}], density: 0.9}}
        parameters: {normalize: true, lambda: 0.8}
        dtype: float32
    """,
    "sce": """
        merge_method: sce
        base_model: BASE
        models: [{model: FT0}, {model: FT1}, {model: FT2}]
        parameters: {select_topk: 0.4}
        dtype: float32
    """,
    "model_stock_2": """
        merge_method: model_stock
        base_model: BASE
        models: [{model: FT0}, {model: FT1}]
        dtype: float32
    """,
    "model_stock_4": """
        merge_method: model_stock
        base_model: BASE
        models: [{model: FT0}, {model: FT1}, {model: FT2}, {model: FT3}]
        parameters: {filter_wise: true}
        dtype: float32
    """,
    "arcee_fusion": """
        merge_method: arcee_fusion
        base_model: BASE
        models: [{model: BASE}, {model: FT0}]
        dtype: float32
    """,
    "ram": """
        merge_method: ram
        base_model: BASE
        models: [{model: FT0}, {model: FT1}]
        dtype: float32
    """,
    "ramplus_tl": """
        merge_method: ramplus_tl
        base_model: BASE
        models: [{model: FT0}, {model: FT1}, {model: FT2}]
        parameters: {r: 0.2, alpha: 0.3}
        dtype: float32
    """,
}


# karcher's mean takes the inputs in another order than mergekit's (rounding only: see methods/slerp.py)
RTOL = {"karcher": 1e-5}


@pytest.fixture(scope="module")
def llama_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return family(str(root), llama, n=4)


def _text(text: str, base: str, tuned: list[str]) -> str:
    text = textwrap.dedent(text).replace("BASE", base)
    for i, t in enumerate(tuned):
        text = text.replace(f"FT{i}", t)
    return text


@pytest.fixture(scope="module")
def mergekit_outputs(llama_family, tmp_path_factory):
    """Every config of CONFIGS merged by mergekit (one subprocess for all): {name: (config, out)}."""
    pytest.importorskip("mergekit")
    base, tuned = llama_family
    root = tmp_path_factory.mktemp("mergekit")
    jobs, outputs = [], {}
    for name, text in CONFIGS.items():
        config = write_yaml(str(root / f"{name}.yml"), _text(text, base, tuned))
        outputs[name] = (config, str(root / f"mergekit-{name}"))
        jobs += list(outputs[name])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", MERGEKIT_SCRIPT, *jobs], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outputs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_tensors_as_mergekit(mergekit_outputs, tmp_path, name):
    config, expected_dir = mergekit_outputs[name]
    ours = str(tmp_path / "out")
    merge_checkpoints(config, ours, progress=False)
    expected, got = load_tensors(expected_dir), load_tensors(ours)
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        torch.testing.assert_close(got[key], expected[key], rtol=RTOL.get(name, 2e-6), atol=2e-7, msg=key)
    with open(os.path.join(expected_dir, "config.json")) as f, open(os.path.join(ours, "config.json")) as g:
        assert json.load(g)["num_hidden_layers"] == json.load(f)["num_hidden_layers"]


def test_passthrough_stacks_and_renumbers_layers(llama_family, tmp_path):
    """Output layer j of a frankenmerge is its source layer, scaled where the source says so."""
    base, tuned = llama_family
    config = write_yaml(str(tmp_path / "c.yml"), _text(CONFIGS["passthrough_slices"], base, tuned))
    merge_checkpoints(config, str(tmp_path / "out"), progress=False)
    got, a, b, c = (load_tensors(p) for p in (str(tmp_path / "out"), base, tuned[0], tuned[1]))
    name = "model.layers.{}.mlp.down_proj.weight"
    for out_layer, (source, layer, scale) in enumerate([(a, 0, 1), (a, 1, 1), (b, 1, 0.5), (b, 2, 0.5), (c, 2, 1)]):
        torch.testing.assert_close(got[name.format(out_layer)], source[name.format(layer)] * scale, rtol=0, atol=0)
    assert not any(".layers.5." in k for k in got)
    with open(os.path.join(str(tmp_path / "out"), "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == 5


@pytest.mark.parametrize("text,message", [
    ("merge_method: slerp\nbase_model: BASE\nmodels: [{model: BASE}, {model: FT0}, {model: FT1}]\n"
     "parameters: {t: 0.5}", r"models: merge_method slerp takes exactly 2 models \(the base included\), got 3"),
    ("merge_method: slerp\nbase_model: BASE\nmodels: [{model: BASE}, {model: FT0}]\nparameters: {t: 1.5}",
     r"parameters.t=1.5: must be in \[0, 1\]"),
    ("merge_method: slerp\nbase_model: BASE\nmodels: [{model: BASE}, {model: FT0}]",
     "parameters.t is required by merge_method slerp"),
    ("merge_method: slerp\nmodels: [{model: FT1}, {model: FT0}]\nparameters: {t: 0.5}",
     "base_model is required for merge_method 'slerp'"),
    ("merge_method: model_stock\nmodels: [{model: FT1}, {model: FT0}]", "base_model is required"),
    ("merge_method: nuslerp\nmodels: [{model: FT0, parameters: {weight: 1}}, {model: FT1, parameters: {weight: 1}}, "
     "{model: FT2, parameters: {weight: 1}}]", r"nuslerp takes exactly 2 models besides the base, got 3"),
    ("merge_method: nuslerp\nmodels: [{model: FT0, parameters: {weight: 1}}, {model: FT1}]",
     r"models\[1\] \(.*\) has no weight .*required by merge_method nuslerp"),
    ("merge_method: breadcrumbs\nbase_model: BASE\nmodels: [{model: FT0, parameters: {weight: 1, gamma: 2}}]",
     r"models\[0\].parameters.gamma=2"),
    ("merge_method: sce\nbase_model: BASE\nmodels: [{model: FT0, parameters: {select_topk: 0.5}}]",
     r"models\[0\].parameters.select_topk is a global parameter of sce"),
    ("merge_method: passthrough\nmodels: [{model: FT0}, {model: FT1}]",
     r"models: merge_method passthrough takes exactly 1 models .*got 2"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: FT0, layer_range: [0, 2]}, "
     "{model: FT1, layer_range: [0, 3]}]", r"slices\[0\]: every source must have the same number of layers"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: FT0, layer_range: [2, 1]}]",
     r"slices\[0\].sources\[0\].layer_range=\[2, 1\]"),
    ("merge_method: ties\nbase_model: BASE\nslices:\n  - sources: [{model: FT0, layer_range: [0, 2], "
     "parameters: {weight: 1}}]", r"slices\[0\]: the base model .* is not one of its sources"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: FT0, layer_range: [0, 2], parameters: {t: 1}}]",
     r"slices\[0\].sources\[0\].parameters.t is not a parameter of passthrough"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: FT0, layer_range: [0, 2]}]\n"
     "vfuse: {keep: [{filter: embed, model: FT0}]}", "vfuse.keep and vfuse.name_map work with models:"),
])
def test_bad_configs_name_the_key(llama_family, tmp_path, text, message):
    base, tuned = llama_family
    path = write_yaml(str(tmp_path / "c.yml"), _text(text, base, tuned))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_slice_past_the_models_depth_fails_before_writing(llama_family, tmp_path):
    base, tuned = llama_family
    config = write_yaml(str(tmp_path / "c.yml"), _text(
        "merge_method: passthrough\nslices:\n  - sources: [{model: FT0, layer_range: [2, 4]}]", base, tuned))
    out = str(tmp_path / "out")
    with pytest.raises(Exception, match=r"has no layer 3"):
        merge_checkpoints(config, out, progress=False)
    assert not os.path.exists(out)


def test_della_is_reproducible_and_keyed_by_the_seed(llama_family, tmp_path):
    """DELLA draws from the Philox stream keyed like DARE: the same config gives the same bytes,
    another vfuse.seed other masks (mergekit's torch.bernoulli cannot be matched)."""
    base, tuned = llama_family
    text = _text("""
        merge_method: della
        base_model: BASE
        models:
          - {model: FT0, parameters: {weight: 0.6, density: 0.5, epsilon: 0.1}}
          - {model: FT1, parameters: {weight: 0.4, density: 0.7}}
        dtype: float32
    """, base, tuned)
    runs = []
    for i, seed in enumerate((0, 0, 1)):
        config = write_yaml(str(tmp_path / f"c{i}.yml"), text + f"vfuse: {{seed: {seed}}}\n")
        merge_checkpoints(config, str(tmp_path / f"out{i}"), progress=False)
        runs.append(load_tensors(str(tmp_path / f"out{i}")))
    name = "model.layers.1.mlp.down_proj.weight"
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0][name], runs[2][name])
    base_t = load_tensors(base)[name]
    assert not torch.equal(runs[0][name], base_t) and torch.isfinite(runs[0][name]).all()


@pytest.mark.parametrize("method,sources,parameters", [("slerp", 1, {"t": 0.3}), ("model_stock", 2, {}),
                                                       ("breadcrumbs_ties", 2, {"gamma": 0.05})])
def test_merge_into_a_loaded_model_equals_vfuse_merge(llama_family, tmp_path, method, sources, parameters):
    """A per-tensor method through merge_into_ (the loaded model as the base) writes the bytes
    vfuse merge writes for the same config."""
    from transformers import LlamaForCausalLM

    base, tuned = llama_family
    weights = [0.6, 0.4][:sources]
    lines = [f"  - {{model: {t}, parameters: {{weight: {w}, density: 0.5}}}}" if method == "breadcrumbs_ties"
             else f"  - {{model: {t}}}" for t, w in zip(tuned, weights)]
    if method == "slerp":
        lines.insert(0, f"  - {{model: {base}}}")
    config = write_yaml(str(tmp_path / "c.yml"), f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
                        + "\n".join(lines) + f"\nparameters: {json.dumps(parameters)}\n")
    merge_checkpoints(config, str(tmp_path / "out"), progress=False)
    model = LlamaForCausalLM.from_pretrained(base)
    merge_into_(model, tuned[:sources], weights, method=method, density=0.5, parameters=parameters)
    expected = load_tensors(str(tmp_path / "out"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
