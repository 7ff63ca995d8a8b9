"""`multigran init`: a new model from a Hugging Face tower and LM, their weights in place, the new parts initialised."""

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

from multigran import MultiGranForConditionalGeneration, MultiGranProcessor
from multigran.cli import main
from multigran.tiny import build_tiny_tokenizer


def parts(tmp_path):
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=4))
    tower.save_pretrained(tmp_path / "clip")
    tokenizer = build_tiny_tokenizer(image_token=False)
    llm = LlamaForCausalLM(AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                tie_word_embeddings=True))
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    return tower, llm


def test_init_keeps_released_weights_and_initialises_the_new_parts(tmp_path, capsys):
    tower, llm = parts(tmp_path)
    code = main(["init", str(tmp_path / "model"), "--method", "avg", "--vision", str(tmp_path / "clip"),
                 "--llm", str(tmp_path / "llm"), "--settings", '{"compat": false}'])
    assert code == 0, capsys.readouterr().err
    model = MultiGranForConditionalGeneration.from_pretrained(tmp_path / "model").eval()
    for key, value in tower.state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[key], value), key
    for key, value in llm.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[key], value), key
    assert model.language_model.lm_head.weight.data_ptr() == model.language_model.model.embed_tokens.weight.data_ptr()
    saved = load_file(tmp_path / "model" / "model.safetensors")
    assert "language_model.lm_head.weight" not in saved  # tied: stored once
    # New parts: the router's voter ~ N(0, 1) (its paper init), the newline ~ N(0, 1/D), the projector non-zero.
    assert 0.5 < model.visual.router.voter.std() < 1.5
    assert model.visual.image_newline.abs().sum() > 0 and model.visual.projector.linear_1.weight.abs().sum() > 0
    assert model.config.method_settings == {"compat": False}
    processor = MultiGranProcessor.from_pretrained(tmp_path / "model")
    assert processor.image_token_id == len(build_tiny_tokenizer(image_token=False))  # added after the vocabulary
    from PIL import Image

    inputs = processor(images=Image.new("RGB", (40, 30), (200, 10, 10)), text="USER: <image>\nWhat? ASSISTANT:")
    output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 2


def test_init_errors_name_the_problem(tmp_path, capsys):
    parts(tmp_path)
    assert main(["init", str(tmp_path / "m"), "--method", "mg", "--vision", str(tmp_path / "clip"),
                 "--llm", str(tmp_path / "llm")]) == 2
    assert "needs its pretrained high-res tower" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "m"), "--vision", str(tmp_path / "nope"), "--llm", str(tmp_path / "llm")]) == 2
