"""The tiny Llama's tokenizer as a real Hugging Face tokenizer, with the chat template the model declares.

    from helpers.course.tokenizer import load_tokenizer, TOKENIZER_DIR
    tok = load_tokenizer()                                  # transformers.PreTrainedTokenizerFast
    tok.encode("It was")                                    # [73, 116, 32, 119, 97, 115]  = encode("It was")
    tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    # '<|user|>\nHi\n<|assistant|>\n'

Why one is needed. The model's own "tokenizer" is two one-line functions (`tiny_llama.encode` / `decode`:
token id = byte of the UTF-8 text). Clients of a server do not see those: a chat client sends *messages*,
and the server turns them into a prompt with the **chat template** that ships with the model's tokenizer
(`tokenizer_config.json`'s `chat_template`, a Jinja2 string); `vllm bench serve` and `vllm serve` load the
tokenizer from the model's directory to count tokens. So the course writes the same byte-level tokenizer in
the form every engine reads: a `tokenizers` BPE model with the 256 bytes as its vocabulary and no merges
(GPT-2's byte-to-character table, `ByteLevel`, makes every byte a printable symbol), id = byte value.
`check_tokenizer()` proves it equals `encode` / `decode` on text in many scripts.

The chat template. The tiny Llama was trained on plain English and never saw a chat, so its template is
the simplest one that marks turns, in the style of Zephyr/TinyLlama-Chat's:

    <|system|>\n{content}\n<|user|>\n{content}\n<|assistant|>\n{content}\n ... <|assistant|>\n

vLLM applies a tokenizer's template exactly so: `apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)` on the request's messages (vllm/renderers/hf.py,
`safe_apply_chat_template`), then tokenizes the string. The model has no end-of-sequence token (its vocabulary
is the 256 bytes), so a chat reply ends at `max_tokens` or at a `stop` string the client sends, e.g.
`"\n<|"` (the start of the next turn's marker).
"""
from __future__ import annotations

from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "data" / "tiny_llama"   # next to config.json and the weights
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
CHAT_STOP = "\n<|"   # where a reply ends if the model goes on to write the next turn's marker


def build_tokenizer():
    """The byte-level tokenizer, built from code (no download): a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbol = bytes_to_unicode()                  # byte value -> one printable character
    vocab = {byte_symbol[b]: b for b in range(256)}   # token id = byte value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False, model_max_length=256)


def save_tokenizer(directory: Path = TOKENIZER_DIR) -> Path:
    """Write tokenizer.json and tokenizer_config.json (with the chat template) into `directory`."""
    build_tokenizer().save_pretrained(directory)
    return Path(directory)


def load_tokenizer(directory: Path = TOKENIZER_DIR):
    """The committed tokenizer, as `vllm serve` and `vllm bench serve` load it (AutoTokenizer on the directory)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(directory)


def check_tokenizer(tok=None) -> int:
    """Assert that the tokenizer is `tiny_llama.encode` / `decode` on text in several scripts; returns how many
    texts were checked."""
    from helpers.course.tiny_llama import decode, encode
    tok = tok or load_tokenizer()
    texts = ["It was the best of times", " leading space", "tabs\tand\nnewlines\r\n", "Ünïcödé — “quotes”",
             "中文文本", "emoji 🤖🚀", "<|user|>\nHi\n", "", "a" * 200]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == encode(text), text
        assert tok.decode(encode(text)) == decode(encode(text)) == text, text
    cut = encode("é")[:1]   # half a character: both give U+FFFD
    assert tok.decode(cut) == decode(cut), (tok.decode(cut), decode(cut))
    return len(texts) + 1


if __name__ == "__main__":
    print(f"wrote {save_tokenizer()}; checked on {check_tokenizer()} texts")
