"""``vfuse profile-sequence``: time and memory per stage vs the visual sequence length.

Runs the demo family (``pipeline.demo.build_family``, merged by task arithmetic) through
VisionFuse's visual path and the merged LLM's prefill, sweeping M encoders (the first M
members) × image scale s × keep ratio × batch. Tokens per encoder: every tower gets its
preprocessed image resized to s × its native size, with CLIP's ``interpolate_pos_encoding``,
so each encoder yields ~s² × its native token count (member-a: 64 at s=1, 256 at s=2).

Stages (``VisionFuse.image_tokens``' ``stage`` hook, summed over encoders): towers (incl.
preprocessing and feature-layer selection), scoring (CLS attention), pruning (budget split +
top-k), projection (project_concat), prefill (embedding + LLM forward + last-token logits).
Memory per stage (``mem_source`` column): on CUDA the peak ``torch.cuda.max_memory_allocated``
during the stage above what was allocated at its start (measured); on CPU the growth of the
process's peak RSS (``ru_maxrss``) during the stage — 0 when a stage stays under an earlier
peak, so it shows only stages that set a new high-water mark.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import os
import resource
import statistics
import time
from collections import defaultdict

import torch

STAGES = ("towers", "scoring", "pruning", "projection", "prefill")
COLUMNS = ["encoders", "scale", "tokens_per_image", "keep", "batch", "visual_tokens", "kept_tokens", "prompt_tokens",
           *(f"{s}_ms" for s in STAGES), "total_ms", *(f"{s}_mem_MB" for s in STAGES), "mem_source", "device"]
FULL = dict(encoders=[1, 2, 3], scales=[1, 2, 3, 4], keep=[1.0, 0.5, 0.25], batch=[1, 4], reps=3)
QUICK = dict(encoders=[3], scales=[1, 2], keep=[1.0, 0.5], batch=[1], reps=1)
PROMPT = "<image> describe the picture"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("vfuse profile-sequence plots with matplotlib, which is not installed: "
                          "pip install matplotlib  (or pip install 'vfuse_kernels[profile]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class StageRecorder:
    """``recorder(name)``: a context manager adding the stage's time (ms) and memory (MB) to the totals."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ms, self.mem = defaultdict(float), defaultdict(float)
        self.source = "cuda max_memory_allocated" if device.type == "cuda" else "cpu ru_maxrss growth"

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        yield
        self._sync()
        self.ms[name] += (time.perf_counter() - start) * 1e3
        if self.device.type == "cuda":
            grown = torch.cuda.max_memory_allocated(self.device) - base
        else:
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        self.mem[name] = max(self.mem[name], grown / 2**20)


def _run(model, pixel_values, batch, device):
    """One pass of the visual path + prefill; returns the recorder and the token counts."""
    recorder = StageRecorder(device)
    pixels = [pv.expand(batch, -1, -1, -1) for pv in pixel_values]
    tokens, counts = model.image_tokens(pixel_values=pixels, stage=recorder)
    ids = model.expand_prompt(PROMPT, tokens.shape[1]).expand(batch, -1)
    with recorder("prefill"), torch.no_grad():
        hidden = model.language_model(inputs_embeds=model._embed(ids, tokens)).last_hidden_state
        model.lm_head(hidden[:, -1])
    return recorder, counts, ids.shape[1]


def sweep(device: str = "cpu", quick: bool = False, cache_dir: str | None = None, log=print) -> list[dict]:
    """Rows of ``COLUMNS``: median stage times over the repetitions, the largest memory figure."""
    from .pipeline.demo import build_family, default_cache_dir, demo_image
    from .pipeline.visionfuse import VisionFuse

    grid = QUICK if quick else FULL
    device = torch.device(device)
    base, members = build_family(cache_dir or default_cache_dir(), log=log)
    members = members[:max(grid["encoders"])]  # the LLaVA-1.5 members (pixels rescaled below: no anyres)
    fused = VisionFuse.from_pretrained(members, base_model=base, method="task_arithmetic", device=device)
    for enc in fused.encoders:  # towers accept images larger than their native size
        enc.tower.forward = functools.partial(type(enc.tower).forward, enc.tower, interpolate_pos_encoding=True)
    image = demo_image()
    rows = []
    for m in grid["encoders"]:
        encoders = list(fused.encoders[:m])
        for scale in grid["scales"]:
            pixel_values = []
            for enc in encoders:
                pv = enc.preprocess(image)["pixel_values"].to(device, fused.dtype)
                pixel_values.append(torch.nn.functional.interpolate(pv, scale_factor=scale, mode="bilinear"))
            for keep in grid["keep"]:
                model = VisionFuse(fused.host, encoders, fused.tokenizer, keep=None if keep >= 1 else keep)
                for batch in grid["batch"]:
                    _run(model, pixel_values, batch, device)  # warm-up
                    runs = [_run(model, pixel_values, batch, device) for _ in range(grid["reps"])]
                    counts, prompt = runs[0][1], runs[0][2]
                    row = {"encoders": m, "scale": scale, "tokens_per_image": sum(n for n, _ in counts), "keep": keep,
                           "batch": batch, "visual_tokens": batch * sum(n for n, _ in counts),
                           "kept_tokens": batch * sum(k for _, k in counts), "prompt_tokens": prompt}
                    for s in STAGES:
                        row[f"{s}_ms"] = statistics.median(r.ms[s] for r, _, _ in runs)
                        row[f"{s}_mem_MB"] = max(r.mem[s] for r, _, _ in runs)
                    row["total_ms"] = sum(row[f"{s}_ms"] for s in STAGES)
                    row.update(mem_source=runs[0][0].source, device=str(device))
                    log(f"  M={m} s={scale} keep={keep} B={batch}: {row['visual_tokens']} visual tokens -> "
                        f"{row['kept_tokens']} kept, {row['total_ms']:.1f} ms")
                    rows.append(row)
    return rows


def plot(rows: list[dict], path: str) -> None:
    """Stacked time per stage vs total visual tokens (batch × ΣN), one panel per keep ratio."""
    plt = _pyplot()
    keeps = sorted({r["keep"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(keeps), figsize=(5 * len(keeps), 4), squeeze=False, sharey=True)
    for ax, keep in zip(axes[0], keeps):
        points = sorted((r for r in rows if r["keep"] == keep), key=lambda r: (r["visual_tokens"], r["encoders"]))
        x = range(len(points))
        bottom = [0.0] * len(points)
        for stage in STAGES:
            heights = [r[f"{stage}_ms"] for r in points]
            ax.bar(x, heights, bottom=bottom, label=stage)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xticks(list(x), [f"{r['visual_tokens']}\nM{r['encoders']} B{r['batch']}" for r in points], fontsize=7)
        ax.set_title(f"keep {keep:g}")
        ax.set_xlabel("visual tokens (batch × ΣN)")
    axes[0][0].set_ylabel("time per stage (ms)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"VisionFuse demo family: visual path + prefill ({rows[0]['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def profile_sequence(out_dir: str, device: str = "cpu", quick: bool = False, cache_dir: str | None = None,
                     log=print) -> tuple[str, str]:
    """Runs the sweep; writes OUT/profile.csv and OUT/profile.png and returns their paths."""
    _pyplot()  # fail before the sweep, not after it
    rows = sweep(device, quick, cache_dir, log=log)
    os.makedirs(out_dir, exist_ok=True)
    csv_path, png_path = os.path.join(out_dir, "profile.csv"), os.path.join(out_dir, "profile.png")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, png_path)
    log(f"wrote {csv_path} and {png_path}")
    return csv_path, png_path
