"""transformers' own SAM 3 pipeline from an image file, as its documentation runs it, in a process of its own.

``python sam3_reference_pipeline.py SPEC.json``: for each run of the spec (``image``, ``phrases``, ``boxes``,
``labels``, ``threshold``, ``out``), ``load_image`` (EXIF orientation applied), then ``Sam3Processor`` (its
image processor at the checkpoint's input size, the checkpoint's CLIP tokenizer), ``Sam3Model`` and
``post_process_instance_segmentation`` at the original size, one phrase at a time. Writes to the run's ``out``
(.npz), per phrase ``i``: ``pixels`` (the processor's pixel values), ``scores_i``, ``boxes_i``, ``masks_i``.

Test oracle only. torchvision is replaced by the ported kernels of ``reference_torchvision`` (installed before
transformers is imported, hence the separate process). Without exemplar boxes a padding box is given to the
model: transformers then skips the geometry encoder, which Meta's SAM 3 and keras-hub always run (its CLS
token joins the prompt), and the padding box gives transformers the same sequence.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(spec_path: str) -> None:
    import reference_torchvision

    reference_torchvision.install()
    from transformers import CLIPTokenizer, Sam3Model, Sam3Processor
    from transformers.image_utils import load_image
    from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

    spec = json.loads(Path(spec_path).read_text())
    checkpoint = spec["checkpoint"]
    model = Sam3Model.from_pretrained(checkpoint).eval()
    size = model.config.vision_config.backbone_config.image_size
    processor = Sam3Processor(Sam3ImageProcessor(size={"height": size, "width": size}),
                              CLIPTokenizer.from_pretrained(checkpoint))
    for run in spec["runs"]:
        _run(processor, model, load_image, run)


def _run(processor, model, load_image, spec: dict) -> None:
    import numpy as np
    import torch

    image = load_image(spec["image"])
    out = {}
    for index, phrase in enumerate(spec["phrases"]):
        kwargs = {}
        if spec.get("boxes"):
            kwargs = {"input_boxes": [spec["boxes"]], "input_boxes_labels": [spec["labels"]]}
        inputs = processor(images=image, text=phrase, return_tensors="pt", **kwargs)
        if not spec.get("boxes"):
            inputs["input_boxes"] = torch.full((1, 1, 4), -10.0)
            inputs["input_boxes_labels"] = torch.tensor([[-10]])
        original_sizes = inputs.pop("original_sizes").tolist()
        with torch.no_grad():
            outputs = model(**inputs)
        result = processor.post_process_instance_segmentation(
            outputs, threshold=spec["threshold"], mask_threshold=0.5, target_sizes=original_sizes)[0]
        out["pixels"] = inputs["pixel_values"].numpy()
        out[f"scores_{index}"] = result["scores"].numpy()
        out[f"boxes_{index}"] = result["boxes"].numpy()
        out[f"masks_{index}"] = result["masks"].numpy().astype(bool)
    np.savez(spec["out"], **out)


if __name__ == "__main__":
    main(sys.argv[1])
