"""``merge_into_``: merge checkpoints into a model that is already loaded (on any device),
streaming the other checkpoints tensor by tensor so that only one copy of the model is
ever resident — the VisionFuse pipeline merges its M language models this way.

Tensors on the CPU read the checkpoints as zero-copy views of the files' pages; tensors on
an accelerator read them through a ``DeviceReader`` (pinned staging buffers, copies on a
side stream) while the previous tensors merge on the caller's current stream; the next
tensors' reads run ahead within the largest tensor's inputs. Nothing waits for the
device: the merged tensors are ready in stream order, like any other kernel's output."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack, nullcontext

import torch

from .. import ops
from .._backend import DTYPE_CODES
from .checkpoint import (Checkpoint, CheckpointError, DeviceReader, HostReader, as_tensor, read_ahead, staged,
                         staging_bytes)
from .config import method_spec
from .methods import TensorInputs
from .plan import rewrite_prefix, tensor_seed


def merge_into_(
    model: torch.nn.Module,
    sources: Sequence[str | Checkpoint],
    weights: float | Sequence[float],
    *,
    method: str = "task_arithmetic",
    density: float | Sequence[float] = 1.0,
    prefix_map: Mapping[str, str] | None = None,
    skip: Sequence[str] = (),
    seed: int = 0,
    staging: bool | None = None,
    parameters: Mapping[str, object] | None = None,
    **merge_kwargs,
) -> dict[str, int]:
    """θ ← θ + scale · combine(wᵢ · sparsify(θᵢ − θ)) for every floating tensor of
    ``model.state_dict()``, in place, with ``θᵢ`` read from ``sources`` one tensor at a time.

    ``method`` may also be any per-tensor mergekit method (``merging.methods``: slerp,
    model_stock, …) with the model as its base and the sources as the other models:
    ``weights`` and ``density`` fill its per-model ``weight`` / ``density`` parameters where it
    has them, ``parameters`` its other parameters (plain values, mergekit's names).

    ``prefix_map`` rewrites the model's tensor names into the sources' (e.g.
    ``{"model.language_model.": "model."}`` to merge an LLM checkpoint into a VLM); tensors
    no source has, and names containing any string in ``skip``, stay untouched. Tied
    tensors are merged once. ``merge_kwargs`` go to ``delta_merge`` (normalize, scale,
    consensus, rescale). Every shape is checked before any tensor changes. ``staging``:
    read through pinned staging buffers (default: for tensors on any device but the CPU;
    ``True`` runs that route for CPU tensors too, for tests). Returns counts of merged and
    untouched tensors.
    """
    if isinstance(sources, (str, Checkpoint)):
        raise TypeError("sources must be a list of checkpoints (paths or Checkpoint objects), got a single one")
    if not sources:
        raise ValueError("sources must name at least one checkpoint")
    with ExitStack() as stack:
        checkpoints = [s if isinstance(s, Checkpoint) else stack.enter_context(Checkpoint(s)) for s in sources]
        n = len(checkpoints)
        weights = list(weights) if isinstance(weights, Sequence) else [float(weights)] * n
        densities = list(density) if isinstance(density, Sequence) else [float(density)] * n
        if len(weights) != n or len(densities) != n:
            raise ValueError(f"{n} sources but {len(weights)} weights and {len(densities)} densities")
        spec = method_spec(method) if method not in ops.METHODS else None
        per_model, base_params, shared = _method_parameters(spec, n, weights, densities, dict(parameters or {}))
        jobs, counts = _jobs(model, checkpoints, dict(prefix_map or {}), skip)
        reads = [[(checkpoints[k], src) for k, src in present] for _, _, present in jobs]
        largest = max((ck.tensors[src].nbytes for job in reads for ck, src in job), default=1)
        readers: dict[torch.device, HostReader | DeviceReader] = {}

        def reader_of(i: int) -> HostReader | DeviceReader:
            device = jobs[i][1].device
            if device not in readers:
                if staged(device) if staging is None else staging:
                    readers[device] = DeviceReader(device, slot_bytes=staging_bytes(largest))
                else:
                    readers[device] = HostReader()
                stack.callback(readers[device].close)
            return readers[device]

        sparse = method in ops.SPARSE_METHODS
        for (name, data, present), tensor_reads, tuned in zip(jobs, reads, read_ahead(reads, reader_of)):
            host = isinstance(readers[data.device], HostReader)
            if host:  # the bytes of the files' pages: viewed as tensors
                tuned = [as_tensor(raw, ck.tensors[src].dtype, ck.tensors[src].shape)
                         for raw, (ck, src) in zip(tuned, tensor_reads)]
            with torch.cuda.device(data.device) if data.is_cuda else nullcontext():
                if spec is not None:
                    data.copy_(spec.merge(TensorInputs(name, [data, *tuned], 0,
                                                       [base_params] + [per_model[k] for k, _ in present], shared,
                                                       tensor_seed(seed, name))))
                else:
                    ops.delta_merge(data, tuned, [weights[k] for k, _ in present], method=method,
                                    density=[densities[k] for k, _ in present] if sparse else 1.0,
                                    seed=tensor_seed(seed, name), out=data, **merge_kwargs)
            del tuned
            if host:
                HostReader.release(tensor_reads)
    return counts


def _method_parameters(spec, n: int, weights, densities, parameters: dict):
    """(each source's parameters, the loaded model's, the global ones) of a per-tensor method,
    checked against its declarations with defaults filled; Nones for a fused method."""
    if spec is None:
        if parameters:
            raise ValueError(f"parameters= is for per-tensor methods; pass {sorted(parameters)} as keyword arguments")
        return None, None, None
    from .methods import REQUIRED

    problem = spec.count_problem(n + 1, True)
    if problem:
        raise ValueError(f"{problem} (the loaded model is the base)")
    known = {*spec.model_params, *spec.global_params}
    unknown = set(parameters) - known
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]!r} is not a parameter of {spec.name} ({', '.join(sorted(known))})")
    given = {"weight": weights, "density": densities}

    def value(key, param, k=None):
        found = given[key][k] if k is not None and key in given else parameters.get(key, param.default)
        if found is REQUIRED:
            raise ValueError(f"method {spec.name!r} needs parameters={{{key!r}: ...}}")
        problem = param.check(found) if param.check is not None and found is not None else None
        if problem:
            raise ValueError(f"{key}={found!r}: {problem}")
        return found

    per_model = [{key: value(key, param, k) for key, param in spec.model_params.items()} for k in range(n)]
    base = {key: value(key, param) for key, param in spec.model_params.items() if param.scope == "input"}
    shared = {key: value(key, param) for key, param in spec.global_params.items()}
    return per_model, base, shared


def _jobs(model: torch.nn.Module, checkpoints: list[Checkpoint], prefix_map: dict[str, str], skip: Sequence[str]):
    """(model name, tensor, [(source index, source name)]) of every tensor to merge, and the
    counts; raises, naming both tensors, on the first shape mismatch."""
    seen: set[int] = set()
    jobs = []
    counts = {"merged": 0, "untouched": 0}
    for name, tensor in model.state_dict(keep_vars=True).items():
        data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
        if data.dtype not in DTYPE_CODES or any(s in name for s in skip) or data.data_ptr() in seen:
            counts["untouched"] += 1
            continue
        seen.add(data.data_ptr())
        src = rewrite_prefix(name, prefix_map)
        present = [(k, src) for k, ck in enumerate(checkpoints) if src in ck.tensors]
        if not present:
            counts["untouched"] += 1
            continue
        for k, _ in present:
            info = checkpoints[k].tensors[src]
            if info.shape != tuple(data.shape):
                raise CheckpointError(f"{checkpoints[k].path}: tensor {src!r} has shape {info.shape}, "
                                      f"the model's {name!r} has {tuple(data.shape)}")
        jobs.append((name, data, present))
        counts["merged"] += 1
    return jobs, counts
