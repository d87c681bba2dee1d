"""Cost of the statistics pass: collecting forward time ÷ plain forward time over the same tokens (goal ≤ 1.5)."""

from __future__ import annotations

import time

from common import Bench, torch

from moecompress.calib.collect import collect_stats
from moecompress.calib.data import CalibSpec, load_calibration


def measure(b: Bench, samples: int = 64, seqlen: int = 256, repeats: int = 3) -> list[tuple[str, float, float]]:
    calib = load_calibration(CalibSpec(source=b.calib_spec.source, samples=samples, seqlen=seqlen), b.tok)
    batches = list(calib.batches(8))
    total = int(calib.attention_mask.sum())

    def plain() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for ids, mask in batches:
                b.model(input_ids=ids, attention_mask=mask, use_cache=False)
        return time.perf_counter() - t0

    rows = []
    for impl in ("grouped_mm", "eager"):
        b.model.set_experts_implementation(impl)
        plain()
        t_plain = min(plain() for _ in range(repeats))
        t_stats = min(collect_stats(b.model, batches, total_tokens=total).meta["collect_seconds"] for _ in range(repeats))
        rows.append((impl, t_plain, t_stats))
    b.model.set_experts_implementation("grouped_mm")
    print(f"statistics pass over {total:,} tokens (best of {repeats}):")
    for impl, tp, ts in rows:
        print(f"  plain forward ({impl:10s}) {tp:6.2f}s   statistics pass {ts:6.2f}s   ratio {ts / tp:.2f}")
    return rows


if __name__ == "__main__":
    measure(Bench(val_docs=10, mc_rows=10))
