"""One QAT training step against one FP32 step of the same model on the same batch, as a ratio.

Steps timed (forward, loss, backward, optimizer step, and for yoloq the hook's oscillation update;
every row steps a fused AdamW, as ``yoloq qat`` builds it):

  fp32      the eager model in train mode (BN with batch statistics) and its own loss
  yoloq     ``prepare_qat(model, "w4a4")``: LSQ weight (per-channel) and activation quantizers, 16-bit
            pre-activation quantizers, BN kept after each quantized conv, ``QATHook.after_step``
  torch_ao  torch.ao FX QAT (``prepare_qat_fx``, default x86 QAT qconfig: 8-bit fake-quant of weights
            and activations, Conv-BN fused into ``ConvBn`` QAT modules) on the eager model in train
            mode, its C2f blocks patched so symbolic tracing can follow them (``list(t.chunk(2, 1))``
            iterates a Proxy; indexing the chunks does not)

The three alternate within each round so drift and the idle-VM slowdown hit them alike; the
figures are medians over rounds after warm-up, and each ratio is given twice: of the medians, and
as the median of the per-round ratios (``_paired``, less moved by the VM's speed drifting).
Default: yolov8n (random weights; the step time does not depend on them), 320 x 320, batch 8,
2 threads.

    python benchmarks/qat_step.py [--model yolov8n] [--imgsz 320] [--batch 8] [--rounds 10]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

import yoloq
from yoloq.sources import load_model
from yoloq.tools.heads import HeadLayout
from yoloq.tools.qat import fused_optimizer
from yoloq.tools.qat_hook import QATHook


def fake_targets(batch: int, per_image: int = 6, nc: int = 80, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = batch * per_image
    image = torch.arange(batch).repeat_interleave(per_image).float()
    cls = torch.randint(0, nc, (n,), generator=gen).float()
    xy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
    return torch.cat((image[:, None], cls[:, None], xy, wh), 1)


def step_fn(forward, params_or_groups, loss_fn, images, targets, after=None):
    optimizer = fused_optimizer(torch.optim.AdamW, params_or_groups, lr=1e-5)  # as yoloq qat builds it

    def step() -> float:
        start = time.perf_counter()
        loss, _ = loss_fn(forward(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after is not None:
            after()
        return time.perf_counter() - start

    return step


def _traceable_c2f_forward(self, x: torch.Tensor) -> torch.Tensor:
    halves = self.cv1(x).chunk(2, 1)
    parts = [halves[0], halves[1]]
    for block in self.m:
        parts.append(block(parts[-1]))
    return self.cv2(torch.cat(parts, 1))


def torch_ao_qat(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    from yoloq.models.ultralytics_blocks import C2f

    original = C2f.forward
    C2f.forward = _traceable_c2f_forward
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("x86"), (example,))
    finally:
        C2f.forward = original


def paired_ratio(times: list[float], baseline: list[float]) -> float:
    """Median over rounds of ``times[r] / baseline[r]`` (the two ran back to back in round r)."""
    return round(statistics.median(t / b for t, b in zip(times, baseline)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="yolov8n")
    parser.add_argument("--recipe", default="w4a4")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, args.imgsz, args.imgsz)
    model = load_model(args.model)
    layout = HeadLayout.from_model(model)
    targets = fake_targets(args.batch, nc=layout.nc)
    loss_fn = layout.make_loss(args.imgsz)

    fp32_model = load_model(args.model).train()
    eager_loss = layout.make_loss(args.imgsz)
    steps = {"fp32": step_fn(fp32_model, fp32_model.parameters(), lambda raw, t: eager_loss.loss(raw, t),
                             images, targets)}

    qm = yoloq.prepare_qat(model, args.recipe, calib=[images])
    hook = QATHook(qm)
    qm.graph_module.train()
    steps["yoloq"] = step_fn(qm.graph_module, hook.param_groups(1e-5, 1e-5), loss_fn, images, targets,
                             hook.after_step)
    notes = {}
    try:
        ao = torch_ao_qat(load_model(args.model), images[:1])
        steps["torch_ao"] = step_fn(ao, ao.parameters(), lambda raw, t: eager_loss.loss(raw, t), images, targets)
    except Exception as exc:  # a peer that cannot prepare is a result, not a crash
        notes["torch_ao"] = f"{type(exc).__name__}: {exc}"[:300]

    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.warmup + args.rounds):
        for name, step in steps.items():
            seconds = step()
            if r >= args.warmup:
                times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    row = {"benchmark": "qat_step", "model": args.model, "recipe": args.recipe, "imgsz": args.imgsz,
           "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
           **{f"{name}_s": round(value, 4) for name, value in median.items()},
           "yoloq_over_fp32": round(median["yoloq"] / median["fp32"], 3),
           # the same ratio taken within each round, then the median: steadier when the VM's speed drifts
           "yoloq_over_fp32_paired": paired_ratio(times["yoloq"], times["fp32"])}
    if "torch_ao" in median:
        row["torch_ao_over_fp32"] = round(median["torch_ao"] / median["fp32"], 3)
        row["torch_ao_over_fp32_paired"] = paired_ratio(times["torch_ao"], times["fp32"])
    row.update({f"{k}_error": v for k, v in notes.items()})
    print(json.dumps(row))


if __name__ == "__main__":
    main()
