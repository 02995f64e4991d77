"""Images per second of SAM 3 concept segmentation: our engine (keras-hub, torch backend) against transformers'
``Sam3Model`` on the same random weights, images and phrases, in one run.

Run ``python -m benchmarks.sam3 [--quick] [--json]``. Needs the test extra (transformers). Both sides do the
work of one pre-annotation: encode the image once, find every phrase's instances, keep those above the
threshold and upsample their masks to the image's size. transformers follows its documented reuse pattern
(``get_vision_features`` once, then one forward per phrase); ours batches the phrases. Text prompts only:
transformers' box prompts need torchvision, which does not import beside our torch. Each config's outputs are
also compared (maximum score difference) so the figures are of the same computation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

THRESHOLD = 0.3
PHRASES = ["cat", "dog", "yellow school bus", "tree", "person"]
CONFIGS = {
    # name: (image_size, hidden, vision_layers, queries)
    "tiny": dict(image_size=112, hidden=32, vision_layers=2, queries=10),
    "larger": dict(image_size=336, hidden=256, vision_layers=4, queries=100),
    # SAM 3's own resolution (1008 px: a 288x288 pixel decoder per phrase) and query count; few, narrow layers.
    "full-res": dict(image_size=1008, hidden=256, vision_layers=2, queries=200),
}


def _reference_segment(model, tokenizer, pixels, phrases, height: int, width: int):
    import torch
    import torch.nn.functional as F

    tokens = tokenizer(phrases, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        vision = model.get_vision_features(pixel_values=pixels)
        scores_all = []
        for row in range(len(phrases)):
            out = model(vision_embeds=vision, input_ids=tokens["input_ids"][row:row + 1],
                        attention_mask=tokens["attention_mask"][row:row + 1])
            scores = (out.pred_logits.sigmoid() * out.presence_logits.sigmoid())[0]
            keep = scores > THRESHOLD
            if keep.any():
                F.interpolate(out.pred_masks[0, keep][None].sigmoid(), size=(height, width), mode="bilinear",
                              align_corners=False)
            scores_all.append(scores.numpy())
    return np.stack(scores_all)


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def bench(name: str, images: int, repeat: int, workdir: Path) -> dict:
    import torch
    from transformers import CLIPTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from sam3_factory import reference_model, save_tiny_checkpoint

    from ml_backend.sam3.loading import load_sam3_engine

    checkpoint = save_tiny_checkpoint(workdir / name, weight_scale=3.0, **CONFIGS[name])
    engine = load_sam3_engine(str(checkpoint), device="cpu")
    reference = reference_model(checkpoint)
    tokenizer = CLIPTokenizer.from_pretrained(str(checkpoint))
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(images)]

    def ours() -> None:
        for image in batch:  # every kept mask at the image's size, as transformers' side makes them
            [candidate.materialize() for row in engine.segment(image, PHRASES, threshold=THRESHOLD) for candidate in row]

    def theirs() -> None:
        for image in batch:
            pixels = torch.from_numpy(engine._pixels(image)).permute(0, 3, 1, 2)
            _reference_segment(reference, tokenizer, pixels, PHRASES, *image.shape[:2])

    # Same computation: transformers given one padding box (so that it runs the geometry encoder and its CLS
    # token as Meta's SAM 3 and ours do without boxes) must give our scores.
    pixels = torch.from_numpy(engine._pixels(batch[0])).permute(0, 3, 1, 2).repeat(len(PHRASES), 1, 1, 1)
    tokens = tokenizer(PHRASES, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = reference(pixel_values=pixels, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                        input_boxes=torch.full((len(PHRASES), 1, 4), -10.0),
                        input_boxes_labels=torch.full((len(PHRASES), 1), -10))
    ref_scores = (out.pred_logits.sigmoid() * out.presence_logits.sigmoid()).numpy()
    our_scores = engine._run(batch[0], PHRASES, None, None)[0].cpu().numpy()
    ours_s, theirs_s = _time(ours, repeat), _time(theirs, repeat)
    return {"config": name, "params": sum(p.numel() for p in reference.parameters()), "images": images,
            "phrases": len(PHRASES), "ours_images_per_s": images / ours_s, "transformers_images_per_s": images / theirs_s,
            "speedup": theirs_s / ours_s, "max_score_difference": float(np.abs(our_scores - ref_scores).max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sam3", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny config only, fewer images")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per side; the median is kept")
    parser.add_argument("--config", choices=list(CONFIGS), action="append",
                        help="run only this config (repeatable); default: all of them")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import ml_backend  # noqa: F401  (torch backend before keras)

    names = ["tiny"] if args.quick else args.config or list(CONFIGS)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench(name, 2 if args.quick else args.images, args.repeat, Path(tmp)) for name in names]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'config':8} {'params':>9} {'ours img/s':>11} {'transformers img/s':>19} {'speed-up':>9} {'max |dscore|':>13}")
        for r in rows:
            print(f"{r['config']:8} {r['params']:>9} {r['ours_images_per_s']:>11.3f} {r['transformers_images_per_s']:>19.3f}"
                  f" {r['speedup']:>9.2f} {r['max_score_difference']:>13.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
