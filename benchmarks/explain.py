"""Explanation rendering and D-RISE batching, against the references, in one run.

    .venv/bin/python benchmarks/explain.py [--images 16] [--size 224] [--drise-images 2]
        [--drise-size 128] [--masks 50] [--repeat 3] [--only overlay|drise]

1. Overlay render + encode per image: ``core.heatmap.render_overlays`` (one batched call,
   PNG and JPEG) vs ``shap.image_plot`` and captum's ``visualize_image_attr``
   (``blended_heat_map``), each saved to PNG bytes, on the same images and the same
   Integrated Gradients attributions of a small CNN. Ours is timed from the full-size maps
   and from the stored (<= 64 px) maps the app renders, with torch's default thread count
   and with one thread (matplotlib renders on one; on a busy machine extra threads only
   contend).
2. D-RISE per image with 50 masks: one batched forward of 50 masked images vs one forward
   per mask (``batch_size=1``, the same code otherwise), on the demo detector
   architecture (``core.demo_models``, untrained: the cost is the same) at the demo's
   image size, on the CPU.

Prints seconds per image and the ratios (targets: overlays >= 20x, D-RISE >= 5x).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import warnings
from typing import Callable

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.demo_models import build_demo_model  # noqa: E402
from core.explain.methods import explain_images  # noqa: E402
from core.explain.storage import reduce_maps  # noqa: E402
from core.heatmap import render_overlays  # noqa: E402


def interleaved(candidates: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median seconds per candidate, timed in turn within each round.

    Taking turns exposes every candidate to the same load, so the ratios hold on a busy
    machine even when the absolute times drift.
    """
    for fn in candidates.values():
        fn()  # warm up (imports, caches, first-call allocation)
    runs: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in runs.items()}


def single_threaded(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)
    return run


def scenes(n: int, size: int, seed: int) -> np.ndarray:
    """Dark backgrounds with a few bright bars: images with structure and detector proposals."""
    rng = np.random.default_rng(seed)
    images = (rng.random((n, size, size, 3)) * 40 + 20).astype(np.float32)
    for image in images:
        for _ in range(4):
            y, x = rng.integers(0, size - size // 5, 2)
            h, w = rng.integers(size // 20, size // 5, 2)
            image[y:y + h, x:x + w] = rng.random(3) * 155 + 100
    return images.clip(0, 255).astype(np.uint8)


def classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()


def png_of(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def overlay_benchmark(n: int, size: int, repeat: int) -> None:
    import shap
    from captum.attr import IntegratedGradients, visualization

    images = scenes(n, size, seed=0)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    attr = IntegratedGradients(classifier()).attribute(x, target=0, n_steps=16).permute(0, 2, 3, 1).numpy()
    maps = attr.sum(axis=3)
    pixels = images.astype(np.float32) / 255

    def ours(fmt: str, fields: np.ndarray):
        return lambda: render_overlays(images, fields, signed=True, cmap="RdBu_r", fmt=fmt)

    def with_shap():
        for i in range(n):
            shap.image_plot([attr[i:i + 1]], pixels[i:i + 1], show=False)
            png_of(plt.gcf())

    def with_captum():
        for i in range(n):
            figure, _ = visualization.visualize_image_attr(
                attr[i], pixels[i], method="blended_heat_map", sign="all", show_colorbar=False,
                use_pyplot=False, alpha_overlay=0.5)
            png_of(figure)

    stored = reduce_maps(maps)  # what the app renders: the stored <= 64 px maps
    threads = torch.get_num_threads()
    candidates = {"shap.image_plot -> PNG": with_shap, "captum visualize_image_attr -> PNG": with_captum}
    for fmt in ("png", "jpeg"):
        for label, fields in ((f"{size} px maps", maps), (f"stored {stored.shape[1]} px maps", stored)):
            candidates[f"visionlens {fmt}, {threads} threads, {label}"] = ours(fmt, fields)
            candidates[f"visionlens {fmt}, 1 thread, {label}"] = single_threaded(ours(fmt, fields))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seconds = interleaved(candidates, repeat)
    t_shap, t_captum = seconds.pop("shap.image_plot -> PNG"), seconds.pop("captum visualize_image_attr -> PNG")
    print(f"overlay render+encode per {size}x{size} image ({n} images, median of {repeat} interleaved "
          "runs; ours: PNG rows Up-filtered + zlib run-length level 1, JPEG q90)")
    print(f"  shap.image_plot -> PNG              {t_shap / n * 1e3:8.2f} ms")
    print(f"  captum visualize_image_attr -> PNG  {t_captum / n * 1e3:8.2f} ms")
    for label, t in seconds.items():
        print(f"  {label:<46} {t / n * 1e3:8.2f} ms  {t_shap / t:6.1f}x vs shap, "
              f"{t_captum / t:6.1f}x vs captum")


def drise_benchmark(n: int, size: int, masks: int, repeat: int) -> None:
    torch.manual_seed(0)
    detector = build_demo_model("detection-candidate").eval()
    images = torch.from_numpy(scenes(n, size, seed=1)).permute(0, 3, 1, 2).float() / 255
    targets = np.tile([[size * 0.1, size * 0.1, size * 0.5, size * 0.5, 3]], (n, 1))

    def run(batch_size: int):
        return lambda: [explain_images(detector, images[i:i + 1], "drise", targets[i:i + 1], "detection",
                                       n_masks=masks, grid_size=16, batch_size=batch_size)
                        for i in range(n)]

    np.testing.assert_allclose(run(masks)()[0], run(1)()[0], rtol=1e-4, atol=1e-7)  # same maps
    seconds = interleaved({"batched": run(masks), "single": run(1)}, repeat)
    t_batched, t_single = seconds["batched"] / n, seconds["single"] / n
    print(f"D-RISE per {size}x{size} image, {masks} masks, CPU ({torch.get_num_threads()} threads, "
          f"{n} images, median of {repeat} interleaved runs)")
    print(f"  one batched forward  {t_batched * 1e3:8.1f} ms")
    print(f"  one forward per mask {t_single * 1e3:8.1f} ms   ratio {t_single / t_batched:5.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--drise-images", type=int, default=2)
    parser.add_argument("--drise-size", type=int, default=128, help="the demo detection images' size")
    parser.add_argument("--masks", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["overlay", "drise"], help="run one of the two parts")
    args = parser.parse_args()
    if args.only != "drise":
        overlay_benchmark(args.images, args.size, args.repeat)
    if args.only != "overlay":
        drise_benchmark(args.drise_images, args.drise_size, args.masks, args.repeat)


if __name__ == "__main__":
    main()
