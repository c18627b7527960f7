"""PyTorch ``.bin`` checkpoints (sharded with an index, or one ``pytorch_model.bin``) merge to
the bytes of their safetensors equivalents, through ``vfuse merge`` and ``merge_into_``;
a pickle that would run code, or holds anything but tensors, is refused unexecuted."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from checkpoints import as_bin, family, folder_bytes, llama, write_yaml

from vfuse_kernels.merging import CheckpointError, merge_checkpoints, merge_into_
from vfuse_kernels.merging.checkpoint import Checkpoint

CONFIG = """merge_method: ties
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: {ft1}, parameters: {{weight: 0.4, density: 0.7}}}}
out_dtype: bfloat16
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bin")
    base, tuned = family(str(root), llama, n=2)
    return {"base": base, "ft0": tuned[0], "ft1": tuned[1],
            "base_bin": as_bin(base, str(root / "base_bin")),
            "ft0_bin": as_bin(tuned[0], str(root / "ft0_bin"), single=True),
            "ft1_bin": as_bin(tuned[1], str(root / "ft1_bin"))}


@pytest.mark.parametrize("staging", [False, True], ids=["views", "staged"])
def test_bin_merge_writes_the_safetensors_bytes(models, tmp_path, staging):
    paths = {}
    for kind, names in (("st", dict(base="base", ft0="ft0", ft1="ft1")),
                        ("bin", dict(base="base_bin", ft0="ft0_bin", ft1="ft1_bin"))):
        config = write_yaml(str(tmp_path / f"{kind}.yml"), CONFIG.format(**{k: models[v] for k, v in names.items()}))
        paths[kind] = str(tmp_path / kind)
        merge_checkpoints(config, paths[kind], out_shard_size="30KB", progress=False, staging=staging)
    expected = folder_bytes(paths["st"])
    assert len([n for n in expected if n.endswith(".safetensors")]) > 1
    assert folder_bytes(paths["bin"]) == expected  # every file, byte for byte; no pytorch_model.bin.index.json copied


def test_merge_into_reads_bin(models):
    merged = {}
    for kind in ("", "_bin"):
        model = llama(0)
        merge_into_(model, [models["ft0" + kind], models["ft1" + kind]], [0.5, 0.3], method="ties", density=0.6)
        merged[kind] = model.state_dict()
    assert all(torch.equal(merged[""][k], merged["_bin"][k]) for k in merged[""])


class Hostile:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_pickle_is_refused_unexecuted(models, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": Hostile(str(marker))}, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: not a loadable PyTorch weights file"):
        Checkpoint(str(bad))
    config = write_yaml(str(tmp_path / "c.yml"), CONFIG.format(base=models["base"], ft0=bad, ft1=models["ft1"]))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "vfuse_kernels.cli", "merge", config, str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and "pytorch_model.bin: not a loadable" in proc.stderr
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("content,message", [
    ({"w": torch.ones(2), "step": 3}, "entry 'step' is a int, not a tensor"),
    ([torch.ones(2)], "holds a list, not a dict of tensors"),
    ({"w": torch.ones(2, dtype=torch.complex64)}, "unsupported dtype torch.complex64"),
])
def test_bin_holding_more_than_tensors_is_refused(tmp_path, content, message):
    torch.save(content, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(str(tmp_path))


def test_bin_reads_match_and_non_contiguous_tensors_load(tmp_path):
    base = torch.arange(12.0).view(3, 4)
    torch.save({"t": base.t(), "b": torch.ones(5, dtype=torch.bfloat16)}, tmp_path / "w.bin")
    with Checkpoint(str(tmp_path / "w.bin")) as ck:
        assert torch.equal(ck.view("t"), base.t()) and torch.equal(ck.read("t"), base.t())
        part = torch.empty(8, dtype=torch.uint8)
        ck.read_bytes("b", part, 2)
        assert torch.equal(part, torch.ones(5, dtype=torch.bfloat16).view(torch.uint8)[2:])
        assert [ck.tensors[n].offset for n in ("t", "b")] == [0, 48]  # safetensors' layout: F32 before BF16
