"""The course's shared model (helpers/course/tiny_llama.py): shapes every parallel split relies on, the byte
tokenizer, a silent and deterministic load, and the committed checkpoint's greedy continuation of PROMPT."""
import json

import pytest
import torch

from helpers.course import tiny_llama
from helpers.course.tiny_llama import CONFIG, MODEL_DIR, PROMPT, build_model, decode, encode, generate, load_model

# Greedy continuation of PROMPT by the committed checkpoint. Retraining (python -m helpers.course.tiny_llama train)
# changes these: update them, and re-execute the notebooks that print generated tokens.
EXPECTED_IDS = [32, 111, 117, 114, 32, 102, 97, 116, 104, 101, 114, 115, 32, 98, 114, 111, 117, 103, 104, 116,
                32, 102, 111, 114, 116, 104, 32, 111, 110, 32, 116, 104]        # " our fathers brought forth on th"


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    return load_model()


def test_config_splits_over_tensor_and_pipeline_parallel_degrees():
    assert CONFIG.vocab_size == 256
    assert (CONFIG.hidden_size, CONFIG.intermediate_size, CONFIG.num_hidden_layers) == (128, 256, 4)
    assert (CONFIG.num_attention_heads, CONFIG.num_key_value_heads, CONFIG.head_dim) == (8, 4, 32)
    assert CONFIG.tie_word_embeddings is False
    assert CONFIG._attn_implementation == "eager"
    for tp in (1, 2, 4):
        for size in (CONFIG.vocab_size, CONFIG.hidden_size, CONFIG.intermediate_size,
                     CONFIG.num_attention_heads, CONFIG.num_key_value_heads):
            assert size % tp == 0, f"{size} is not divisible by tp={tp}"
    for pp in (2, 4):
        assert CONFIG.num_hidden_layers % pp == 0


def test_byte_tokenizer_round_trip():
    for text in (PROMPT, "", "naïve café — 100 %", "line\nbreak\ttab"):
        ids = encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert decode(ids) == text
        assert decode(torch.tensor(ids, dtype=torch.long)) == text
    assert encode("Hi") == [72, 105]
    assert decode(encode("é")[:1]) == "\ufffd"          # a cut multi-byte character does not raise


def test_checkpoint_is_small_and_matches_config():
    weights = MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size < 4_000_000
    saved = json.loads((MODEL_DIR / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings"):
        assert saved[key] == getattr(CONFIG, key), key
    assert saved["dtype"] == "float32"


def test_load_model_is_eval_float32_and_deterministic(model):
    assert not model.training
    assert model.config._attn_implementation == "eager"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = torch.tensor([encode(PROMPT)])
    with torch.no_grad():
        first = model(ids).logits
        second = load_model()(ids).logits
    assert first.shape == (1, len(encode(PROMPT)), 256)
    assert torch.equal(first, second)
    assert load_model(dtype=torch.bfloat16).model.embed_tokens.weight.dtype == torch.bfloat16


def test_load_model_prints_nothing(capfd):
    load_model()
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_greedy_continuation_of_prompt_is_varied_and_fixed(model):
    new_ids = generate(model, encode(PROMPT), 32)
    assert len(new_ids) == 32
    assert len(set(new_ids)) >= 8, f"degenerate continuation {new_ids}"
    assert new_ids == EXPECTED_IDS, f"got {new_ids} = {decode(new_ids)!r}"


def test_generate_matches_transformers_generate(model):
    prompt = torch.tensor([encode(PROMPT)])
    reference = model.generate(prompt, do_sample=False, max_new_tokens=16)[0, prompt.shape[1]:].tolist()
    assert generate(model, prompt[0], 16) == reference


def test_generate_rejects_too_long_requests(model):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, encode(PROMPT), CONFIG.max_position_embeddings)


def test_untrained_model_is_seeded_and_differs_from_the_trained_one(model):
    a, b = build_model(seed=0), build_model(seed=0)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, build_model(seed=1).lm_head.weight)
    assert not torch.equal(a.lm_head.weight, model.lm_head.weight)
    assert not a.training and a.config._attn_implementation == "eager"
    assert tiny_llama.CORPUS_PATH.stat().st_size > 5_000
