import json

from mnist_cnn.bench import flops_per_image
from mnist_cnn.cli import main
from mnist_cnn.model import ReferenceCNN

KEYS = [
    "train_images_per_s", "baseline_train_images_per_s", "infer_images_per_s",
    "baseline_infer_images_per_s", "latency_ms_p50", "latency_ms_p99", "matmul_gflops",
    "train_flops_per_image", "time_to_99_0_s", "baseline_time_to_99_0_s", "time_to_99_5_s",
    "device", "threads",
]


def test_flops_per_image_by_hand():
    # conv1 28·28·32·9, conv2 14·14·64·(32·4), dense 3136·1024 and 1024·10 multiply-adds, ×2
    macs = 28 * 28 * 32 * 9 + 14 * 14 * 64 * 32 * 4 + 3136 * 1024 + 1024 * 10
    assert flops_per_image(ReferenceCNN()) == 2 * macs


def test_quick_bench_writes_every_key(tmp_path, data_dir, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out), "--data-dir", str(data_dir)]) == 0
    results = json.loads(out.read_text())
    for key in KEYS:
        assert key in results, key
    for key in KEYS[:8]:
        assert results[key] > 0, key
    assert results["latency_ms_p99"] >= results["latency_ms_p50"]
    assert results["train_flops_per_image"] == 3 * flops_per_image(ReferenceCNN())
    table = capsys.readouterr().out
    assert "baseline: train" in table and "median" in table
    # Two matmul rates: the run's precision, then the other (fp32 was once shown twice).
    matmuls = [line.split("  ")[0] for line in table.splitlines() if line.startswith("matmul 1024")]
    assert len(matmuls) == 2 and len(set(matmuls)) == 2, matmuls
    assert matmuls[0] == f"matmul 1024³, {results['precision']}"
