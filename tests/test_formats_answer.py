"""The answer path: the label config parsed once per text, the /predict answer written by orjson with
the brush RLE straight from its array (the same JSON as before), the library's second parse gone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ml_backend.errors import LabelConfigError
from ml_backend.labeling import build_mask_results, parse_label_config

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
          '<Label value="Object"/></BrushLabels></View>')


def test_a_config_text_is_parsed_once_and_its_result_shared() -> None:
    first = parse_label_config(CONFIG)
    assert parse_label_config(str(CONFIG + " ").strip()) is first  # an equal text from another request
    assert parse_label_config(CONFIG, mask_tag="mask") is not first  # another setting: parsed on its own


def test_a_bad_config_fails_every_time() -> None:
    for _ in range(2):
        with pytest.raises(LabelConfigError):
            parse_label_config("<View><Image name='i' value='$i'/></View>")


def test_the_backend_does_not_have_the_library_parse_the_config_again(monkeypatch) -> None:
    import label_studio_ml.model as library

    from ml_backend.backend import SegmentationBackend

    monkeypatch.setattr(library, "parse_config", lambda *_: pytest.fail("label-studio-tools parsed the config"))
    runtime = type("Runtime", (), {"settings": type("S", (), {"mask_tag": ""})()})()
    backend = SegmentationBackend(label_config=CONFIG, runtime=runtime)
    assert backend.label_config == CONFIG and backend.config.mask.name == "mask"


def test_the_predict_answer_is_the_json_of_the_rle_list() -> None:
    from ml_backend.app import _json_answer
    from ml_backend.brush import encode_rle

    mask = np.zeros((30, 40), bool)
    mask[5:20, 8:30] = True
    config = parse_label_config(CONFIG)
    results = build_mask_results(mask, config=config, label="Object", score=0.5, arrays=True)
    response = _json_answer({"results": [{"result": results, "score": np.float32(0.5)}], "model_version": "v"})
    assert response.mimetype == "application/json"
    body = json.loads(response.get_data())
    assert body["results"][0]["result"][0]["value"]["rle"] == encode_rle(mask)
    assert body["results"][0]["score"] == 0.5 and body["model_version"] == "v"
