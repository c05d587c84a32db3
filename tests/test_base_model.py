"""The shipped toy base model: real diffusers/transformers classes, loaded offline, as good as recorded."""

import json

from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from difflora_kit import backends
from difflora_kit.config import TrainConfig
from difflora_kit.pair import prepare_base
from difflora_kit.toy.pretrain import held_out_quality

FOLDER = backends.resolve("toy")


def test_shipped_model_is_small_and_made_of_library_classes():
    b = backends.load_backend("toy")
    assert isinstance(b.unet, UNet2DConditionModel) and isinstance(b.text_encoder, CLIPTextModel)
    assert isinstance(b.tokenizer, CLIPTokenizer)
    size = sum(p.stat().st_size for p in FOLDER.rglob("*.safetensors"))
    assert size < 10e6
    assert b.scheduler.config.prediction_type == "v_prediction"


def test_recorded_quality_holds_and_is_reproduced_with_the_8bit_base():
    record = json.loads((FOLDER / "model_index.json").read_text())["pretraining"]
    assert record["held_out_quality"]["content_right"] >= 0.9
    measured = held_out_quality(prepare_base("toy", TrainConfig(eight_bit=True)))
    assert measured["content_right"] >= 0.85, measured  # 24 samples: one or two may differ from the fp32 figure
