"""Speed of the reference model under each setting, one change at a time.

    python scripts/train_step_ablation.py            # training steps, then inference chunks
    python scripts/train_step_ablation.py --fp32     # the same choices in fp32 (CPUs without
                                                     # native bf16, where --precision auto picks
                                                     # fp32), and bf16 there once, for scale
    python scripts/train_step_ablation.py --profile  # where a default training step's time goes

Times the same step `mnist-cnn train` takes (slice a uint8 batch, rotate, normalize, forward,
backward, Adam) on random data, for each combination listed below, and inference of 10,000
images in calls of 1,000 split into chunks of various sizes; prints images/s as the median of 3
repeats (min and max beside it; the slow bf16 rows of --fp32 run once). docs/PERFORMANCE.md
quotes its output.
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from mnist_cnn.augment import rotate, sample_angles
from mnist_cnn.data import normalize
from mnist_cnn.model import ReferenceCNN
from mnist_cnn.train import predict_proba


def step_rate(batch=256, bf16=True, channels_last=True, fused=True, dropout=(0.3, 0.7),
              torch_dropout=False, steps=40, repeats=3, profile=False):
    torch.manual_seed(0)
    model = ReferenceCNN(dropout=dropout)
    if torch_dropout:  # swap our rand-mask dropout for torch's bernoulli-mask nn.Dropout
        layers = model.classifier
        for i, layer in enumerate(layers):
            if hasattr(layer, "p"):
                layers[i] = torch.nn.Dropout(layer.p)
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
    if profile:
        from torch.profiler import profile as torch_profile

        with torch_profile() as prof:
            for _ in range(20):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return None
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * batch / (time.perf_counter() - t0))
    return min(rates), statistics.median(rates), max(rates)


CASES = [
    ("fp32, NCHW, foreach Adam, nn.Dropout (plain)",
     dict(bf16=False, channels_last=False, fused=False, torch_dropout=True)),
    ("+ channels-last", dict(bf16=False, fused=False, torch_dropout=True)),
    ("+ bf16 autocast", dict(fused=False, torch_dropout=True)),
    ("+ fused Adam", dict(torch_dropout=True)),
    ("+ rand-mask dropout (the default)", dict()),
    ("default, batch 512", dict(batch=512, steps=20)),
    ("default, batch 1024", dict(batch=1024, steps=10)),
    ("default without dropout (its cost)", dict(dropout=(0.0, 0.0))),
    ("bf16 autocast, NCHW, fused", dict(channels_last=False)),
]

# Where bf16 is slow (no AVX-512 BF16 or AMX), `--precision auto` trains in fp32: do the other
# choices still pay there?
CASES_FP32 = CASES[:2] + [  # plain, then channels-last: both fp32 already
    ("+ fused Adam", dict(bf16=False, torch_dropout=True)),
    ("+ rand-mask dropout (the fp32 default)", dict(bf16=False)),
    ("fp32 default, batch 128", dict(bf16=False, batch=128, steps=80)),
    ("fp32 default, batch 512", dict(bf16=False, batch=512, steps=20)),
    ("fp32, NCHW, fused, rand-mask", dict(bf16=False, channels_last=False)),
    # What --precision bf16 does on such a CPU (slow: a few steps, once).
    ("bf16 autocast, else the default", dict(steps=5, repeats=1)),
]


def inference_rate(chunk: int, bf16: bool = True, repeats: int = 3):
    torch.manual_seed(0)
    model = ReferenceCNN().to(memory_format=torch.channels_last).eval()
    images = torch.randint(0, 256, (10_000, 28, 28), dtype=torch.uint8)
    amp = torch.bfloat16 if bf16 else None
    cpu = torch.device("cpu")
    predict_proba(model, images[:1000], cpu, amp, chunk)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, 10_000, 1000):
            predict_proba(model, images[i : i + 1000], cpu, amp, chunk)
        rates.append(10_000 / (time.perf_counter() - t0))
    return min(rates), statistics.median(rates), max(rates)


def show(name, lo, med, hi):
    print(f"{name:46s} {med:7,.0f} images/s  (min {lo:,.0f}, max {hi:,.0f})", flush=True)


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "--profile" in sys.argv:
        step_rate(profile=True)
        raise SystemExit
    fp32 = "--fp32" in sys.argv
    print("training step")
    for name, kw in CASES_FP32 if fp32 else CASES:
        show(name, *step_rate(**kw))
    print("inference, calls of 1,000 images")
    if fp32:
        for chunk in (1000, 500, 256, 128):
            show(f"fp32, chunks of {chunk}", *inference_rate(chunk, bf16=False))
        show("bf16, chunks of 256", *inference_rate(256, repeats=1))
    else:
        show("fp32, one chunk of 1,000", *inference_rate(1000, bf16=False))
        for chunk in (1000, 500, 256, 128):
            show(f"bf16, chunks of {chunk}", *inference_rate(chunk))
