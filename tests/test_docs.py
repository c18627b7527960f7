"""The README's examples run, and CI runs the README's test command."""
import os
import re

import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    commands = re.findall(r"```bash\n(pip install torch==2.13.0 .+?)\n```", readme)
    assert len(commands) == 2 and commands[0].endswith("vfuse demo")
    assert _read(".ci/run").rstrip().splitlines()[-1] == commands[1]  # its summary closes the CI log


def test_ci_tests_the_oldest_supported_transformers():
    from packaging.version import Version

    floor = re.search(r'"transformers>=([\d.]+)"', _read("pyproject.toml")).group(1)
    tested = re.search(r"^OLDEST_TRANSFORMERS=([\d.]+)$", _read(".ci/run"), re.M).group(1)
    assert Version(tested) == Version(floor)


def test_readme_usage_example_runs(monkeypatch):
    monkeypatch.delenv("VFUSE_BACKEND", raising=False)
    example = re.search(r"## Use\s+```python\n(.+?)```", _read("README.md"), re.S).group(1)
    example = example.replace("4096, 4096", "64, 48")  # same code, small tensors
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["ties"].shape == (64, 48) and torch.isfinite(namespace["base"].float()).all()


def test_docstring_examples():
    import doctest
    import importlib

    for name in ("vfuse_kernels", "vfuse_kernels.ops.delta_merge", "vfuse_kernels.ops.magnitude_threshold",
                 "vfuse_kernels.ops.slerp", "vfuse_kernels.ops.nuslerp", "vfuse_kernels.ops.multislerp",
                 "vfuse_kernels.ops.nearswap", "vfuse_kernels.ops.karcher", "vfuse_kernels.ops.model_stock"):
        module = importlib.import_module(name)
        result = doctest.testmod(module, extraglobs={"torch": torch})
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_readme_token_fusion_example_runs(monkeypatch):
    monkeypatch.delenv("VFUSE_BACKEND", raising=False)
    example = re.search(r"## Token fusion\s+```python\n(.+?)```", _read("README.md"), re.S).group(1)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["tokens"].shape == (2, 288 + 100, 64)
