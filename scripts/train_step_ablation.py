"""Training-step throughput of the reference model under each speed setting, one change at a time.

    python scripts/train_step_ablation.py

Times the same step `mnist-cnn train` takes (slice a uint8 batch, rotate, normalize, forward,
backward, Adam) on random data, for each combination listed below; prints images/s as the median
of 3 repeats (min and max beside it). docs/PERFORMANCE.md quotes its output.
"""

import statistics
import time

import torch
import torch.nn.functional as F

from mnist_cnn.augment import rotate, sample_angles
from mnist_cnn.data import normalize
from mnist_cnn.model import ReferenceCNN


def step_rate(batch=256, bf16=True, channels_last=True, fused=True, dropout=(0.3, 0.7),
              steps=40, repeats=3):
    torch.manual_seed(0)
    model = ReferenceCNN(dropout=dropout)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), 1e-3, fused=fused, foreach=None if fused else True)
    images = torch.randint(0, 256, (batch, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (batch,))

    def step():
        x = images.unsqueeze(1).float().div_(255)
        x = normalize(rotate(x, sample_angles(batch, 20.0))).contiguous(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * batch / (time.perf_counter() - t0))
    return min(rates), statistics.median(rates), max(rates)


CASES = [
    ("fp32, NCHW, foreach Adam (plain eager)", dict(bf16=False, channels_last=False, fused=False)),
    ("+ channels-last", dict(bf16=False, fused=False)),
    ("+ bf16 autocast", dict(fused=False)),
    ("+ fused Adam (the default)", dict()),
    ("default, batch 512", dict(batch=512, steps=20)),
    ("default, batch 1024", dict(batch=1024, steps=10)),
    ("default without dropout (its cost)", dict(dropout=(0.0, 0.0))),
    ("bf16 autocast, NCHW, fused", dict(channels_last=False)),
]

if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, kw in CASES:
        lo, med, hi = step_rate(**kw)
        print(f"{name:42s} {med:7,.0f} images/s  (min {lo:,.0f}, max {hi:,.0f})", flush=True)
