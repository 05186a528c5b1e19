"""The tiny Llama's Hugging Face tokenizer (helpers/course/tokenizer.py) is the course's byte-level encode/decode,
and the committed files are what the code builds."""
import json

from helpers.course.tokenizer import CHAT_TEMPLATE, TOKENIZER_DIR, check_tokenizer, load_tokenizer, save_tokenizer


def test_tokenizer_is_the_byte_level_encode_decode():
    assert check_tokenizer() == 10


def test_committed_tokenizer_is_what_the_code_builds(tmp_path):
    save_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((TOKENIZER_DIR / name).read_text()), name


def test_chat_template_marks_turns():
    tok = load_tokenizer()
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello.\n<|user|>\nAnd?\n<|assistant|>\n"
