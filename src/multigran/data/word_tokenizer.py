"""A word-level tokenizer built locally with `tokenizers`, for the tiny from-scratch demo models.

One token per word (lower-cased) and per punctuation mark, so a one-word answer is one generated token and accuracy
is exact match on decoded words. Special tokens, in id order: <unk> 0, <pad> 1, <s> 2 (bos, prepended by the
tokenizer like Llama's), </s> 3 (eos, ends every assistant turn), <image> 4 (`tokenizer.image_token`).

The chat template follows the transformers message format (content a string, or a list of {"type": "image"} /
{"type": "text", "text": ...} parts) and writes LLaVA's vicuna_v1 turn layout without its system sentence:
    <s>USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: ...
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>", "<image>")
TEMPLATE_WORDS = ("user", "assistant", ":")  # written by the chat template (lower-cased by the normaliser)

CHAT_TEMPLATE = (
    "{% macro render(message) %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}{{ raise_exception('unknown content type: ' + part['type']) }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ render(message) }} "
    "{% elif message['role'] == 'user' %}USER: {{ render(message) }} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ render(message) }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

def build_word_tokenizer(words: Iterable[str], out_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """Tokenizer whose vocabulary is the special tokens, the chat-template words and `words` (lower-cased).

    Each entry of `words` must be one word or one punctuation mark. With `out_dir`, the tokenizer is also saved
    there (`save_pretrained`; reload with `AutoTokenizer.from_pretrained(out_dir)`).
    """
    if isinstance(words, (str, bytes)):
        raise TypeError("build_word_tokenizer: words must be an iterable of words, not a single string")
    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    vocabulary = set(TEMPLATE_WORDS)
    for word in words:
        if not isinstance(word, str):
            raise TypeError(f"build_word_tokenizer: every word must be a str, got {word!r} ({type(word).__name__})")
        if word in SPECIAL_TOKENS:
            continue
        pieces = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(word.lower())]
        if pieces != [word.lower()]:
            raise ValueError(
                f"build_word_tokenizer: {word!r} is not a single word or punctuation mark (splits into {pieces})"
            )
        vocabulary.add(word.lower())
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *sorted(vocabulary)])}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizer
    backend.add_special_tokens(list(SPECIAL_TOKENS))  # matched before normalisation, never split
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", vocab["<s>"])]
    )
    # No decoder: the backend joins tokens with single spaces, which is the word-level decode we want.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        image_token="<image>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(os.fspath(out_dir))
    return tokenizer
