"""The project's benchmarks, in one place, outside the serving path.

Each module runs as ``python -m benchmarks.<name>`` from the repository root and prints
its figures with the reference measured side by side in the same run (same weights, same
image, same prompt). They need the test tools (``scripts/install.sh --test``): the
official ``segment-anything`` and ``label-studio-sdk`` are references, never serving code.

* ``sam``: our SAM engine against the official ``SamPredictor`` (first and cached click).
* ``click``: clicks through the whole backend as Label Studio sends them.
* ``brush``: our brush RLE encoder against the SDK's ``mask2rle``.
* ``training``: the streaming training pipeline against in-memory arrays.
* ``load``: a team of annotators against the backend under gunicorn, against one annotator alone.
* ``session``: annotators working through a project, pre-encoding on against off.
* ``mask_formats``, ``image_decode``, ``sam3``, ``gpu_check``: result forms, image decoding, SAM 3, the GPU table.

``common`` holds the best-of timer and the WIDTHxHEIGHT argument they share.

``official_sam`` builds the official implementation to match a checkpoint (benchmarks and
tests only).
"""
