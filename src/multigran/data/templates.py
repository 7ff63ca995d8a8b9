"""Conversation templates: a LLaVA conversation -> `input_ids` + `labels` (loss only on the assistant's answers).

Templates (names as in LLaVA / LLaVA-NeXT):
- `plain`: pretraining (LLaVA's `conv_llava_plain`): BOS, the image placeholder(s) of the first human turn (its text is
  dropped, as LLaVA does), then the caption and "\\n"; loss on the caption and "\\n". Exactly one human + one gpt turn.
- `vicuna_v1`: "SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>" (LLaVA `conv_vicuna_v1`); loss on " a</s>".
- `llama_3`: BOS "<|start_header_id|>system<|end_header_id|>\\n\\nSYSTEM<|eot_id|>" then per turn
  "<|start_header_id|>ROLE<|end_header_id|>\\n\\nTEXT<|eot_id|>" (Meta's format, LLaVA-NeXT `conv_llava_llama_3`,
  texts stripped as both do); loss on "a<|eot_id|>".
- `qwen_2` (alias `chatml`): "<|im_start|>ROLE\\nTEXT<|im_end|>\\n" with a default system turn (Qwen2's template);
  loss on "a<|im_end|>" (not the "\\n" after it: generation stops at <|im_end|>).
- `chat_template`: the tokenizer's own Jinja chat template. It is rendered incrementally: the assistant span of turn i
  is what `render(turns[:i+1])` adds after `render(turns[:i], add_generation_prompt=True)`; trailing whitespace of
  that span is not a target. The template must render prefixes consistently (checked, with a clear error).

Tokenization is piecewise: every segment (fixed template text, a user turn, an answer) is tokenized on its own and the
ids are concatenated, so an answer's tokens never merge with the prompt's and the label mask is exact by construction.
Every sample starts with the tokenizer's own leading special tokens (what `tokenizer(text)` puts first, e.g. BOS),
as the processor's tokenization does at inference; a `chat_template` rendering that already starts with the BOS
string gets none added. Each `<image>` placeholder is then expanded to its image's visual-token count (labels -100 there).

Special tokens: `llama_3` and `qwen_2` need their control tokens (<|start_header_id|>, <|im_start|>, ...) to be single
tokens. `prepare_tokenizer(tokenizer, template)` adds the missing ones as special tokens and returns them; the caller
must then resize the model's embeddings (`model.resize_token_embeddings(len(tokenizer))`) and save the tokenizer with
the model. `train_command` does both.
"""

from dataclasses import dataclass

IGNORE_INDEX = -100

# LLaVA `conv_vicuna_v1` system prompt.
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# LLaVA-NeXT `conv_llava_llama_3` system prompt.
LLAMA_3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
# Qwen2's default system prompt (its tokenizer chat template).
QWEN_2_SYSTEM = "You are a helpful assistant."

LLAMA_3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_2_TOKENS = ["<|im_start|>", "<|im_end|>"]

TEMPLATE_NAMES = ("plain", "vicuna_v1", "llama_3", "qwen_2", "chatml", "chat_template")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ConversationError(ValueError):
    """A conversation that cannot be encoded (bad roles, empty, wrong image count, too long); says why."""


@dataclass
class Turn:
    role: str  # "system" | "user" | "assistant"
    text: str


def normalize_conversation(conversations, require_answer: bool = True) -> list[Turn]:
    """LLaVA turns ({"from": "human"|"gpt"|"system", "value"}) or chat messages ({"role", "content": str}) -> Turns.

    Checks: a non-empty list; an optional leading system turn; then user and assistant turns alternating, starting
    with the user and (if `require_answer`) ending with the assistant; text values are strings.
    """
    if not isinstance(conversations, list):
        raise ConversationError(f"field 'conversations' must be a list of turns, got {type(conversations).__name__}")
    if not conversations:
        raise ConversationError("field 'conversations' is empty (expected a non-empty list of turns)")
    turns = []
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ConversationError(f"turn {index} is a {type(turn).__name__}, expected an object with 'from'/'value'")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if isinstance(speaker, (list, dict)) or speaker not in ROLES:
            raise ConversationError(
                f"turn {index} has role {str(speaker)[:40]!r} (field 'from'); expected 'human' or 'gpt' (or 'system' "
                "first)"
            )
        if text is None:
            raise ConversationError(f"turn {index} has no field 'value' (its text)")
        if not isinstance(text, str):
            raise ConversationError(f"turn {index} has a {type(text).__name__} value (field 'value'), expected a string")
        turns.append(Turn(ROLES[speaker], text))
    body = turns[1:] if turns[0].role == "system" else turns
    if not body:
        raise ConversationError("the conversation has only a system turn")
    for index, turn in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            offset = len(turns) - len(body)
            raise ConversationError(
                f"turn {index + offset} is from the {turn.role} but the {expected} was expected "
                "(turns must alternate human, gpt, human, gpt, ...)"
            )
    if require_answer and body[-1].role != "assistant":
        raise ConversationError("the conversation ends with a human turn: there is no answer to learn")
    return turns


def prepare_tokenizer(tokenizer, template: str) -> list[str]:
    """Adds the template's control tokens missing from the tokenizer (as special tokens); returns those added.

    If it returns anything, resize the model's embeddings to `len(tokenizer)` before training.
    """
    check_template_name(template)
    needed = {"llama_3": LLAMA_3_TOKENS, "qwen_2": QWEN_2_TOKENS, "chatml": QWEN_2_TOKENS}.get(template, [])
    vocab = tokenizer.get_vocab()
    missing = [token for token in needed if token not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if template == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat_template' needs a tokenizer with a chat_template; this tokenizer has none")
    if template == "chat_template" and tokenizer.chat_template == _jinja_plain():
        # A stage-1 (`plain`) run saves this template with its processor; it drops the user's text, so a later
        # stage that asks for "the tokenizer's own" template would train on answers without their questions.
        raise ValueError("template 'chat_template': this tokenizer's chat template is the `plain` pretraining one "
                         "(saved by a stage-1 run), which drops the user's text; name the conversation template "
                         "(vicuna_v1, llama_3, qwen_2, chatml) in data.template instead")
    return missing


def check_template_name(template: str):
    if template not in TEMPLATE_NAMES:
        raise ValueError(f"unknown conversation template {template!r}; available: {list(TEMPLATE_NAMES)}")


def stop_token_ids(tokenizer, template: str) -> list[int]:
    """Token ids that end an assistant turn in this template (for `generation_config.eos_token_id`)."""
    names = {"llama_3": ["<|eot_id|>"], "qwen_2": ["<|im_end|>"], "chatml": ["<|im_end|>"]}.get(template, [])
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    return ids + [vocab[name] for name in names if name in vocab and vocab[name] not in ids]


# --- segments: (text or token id, is_target) -------------------------------------------------------------------


def _system(turns, default):
    return (turns[0].text, turns[1:]) if turns[0].role == "system" else (default, turns)


def _rounds(turns):
    """Pairs (user text, assistant text or None)."""
    return [(turns[i].text, turns[i + 1].text if i + 1 < len(turns) else None) for i in range(0, len(turns), 2)]


def plain_segments(turns, tokenizer, image_token):
    _, body = _system(turns, "")
    if len(body) > 2:
        raise ConversationError(
            f"template 'plain' (pretraining) takes one human turn and one gpt turn; this conversation has {len(body)}"
        )
    images = image_token * body[0].text.count(image_token)  # LLaVA keeps only the image of the human turn
    answer = [(body[1].text + "\n", True)] if len(body) == 2 else []  # image-only data has no answer
    return [(images, False)] + answer


def vicuna_segments(turns, tokenizer, image_token):
    system, body = _system(turns, VICUNA_SYSTEM)
    segments, prompt = [], system + " "
    for question, answer in _rounds(body):
        prompt += "USER: " + question + " ASSISTANT:"
        if answer is None:
            break
        segments += [(prompt, False), (" " + answer, True), (tokenizer.eos_token_id, True)]
        prompt = ""
    if prompt:
        segments.append((prompt, False))
    return segments


def llama_3_segments(turns, tokenizer, image_token):
    system, body = _system(turns, LLAMA_3_SYSTEM)

    def header(role):
        return "<|start_header_id|>" + role + "<|end_header_id|>\n\n"

    segments = []
    prompt = header("system") + system.strip() + "<|eot_id|>"  # BOS (<|begin_of_text|>) is the tokenizer's
    for question, answer in _rounds(body):
        prompt += header("user") + question.strip() + "<|eot_id|>" + header("assistant")
        if answer is None:
            break
        segments += [(prompt, False), (answer.strip(), True), ("<|eot_id|>", True)]
        prompt = ""
    if prompt:
        segments.append((prompt, False))
    return segments


def qwen_2_segments(turns, tokenizer, image_token):
    system, body = _system(turns, QWEN_2_SYSTEM)
    segments = []
    prompt = "<|im_start|>system\n" + system + "<|im_end|>\n"
    for question, answer in _rounds(body):
        prompt += "<|im_start|>user\n" + question + "<|im_end|>\n<|im_start|>assistant\n"
        if answer is None:
            break
        segments += [(prompt, False), (answer, True), ("<|im_end|>", True)]
        prompt = "\n"
    segments.append((prompt, False))
    return segments


def chat_template_segments(turns, tokenizer, image_token):
    messages = [{"role": turn.role, "content": turn.text} for turn in turns]

    def render(upto, generation_prompt):
        import jinja2

        try:
            return tokenizer.apply_chat_template(
                messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
            )
        except jinja2.TemplateError as error:  # a broken template, or one that refuses this conversation
            raise ConversationError(f"the tokenizer's chat template failed: {type(error).__name__}: {error}") from None

    segments, done = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render(index, True), render(index + 1, False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ConversationError(
                "the tokenizer's chat template does not render conversations incrementally (a prefix of the "
                f"conversation does not render as a prefix of it at turn {index}); use a built-in template instead"
            )
        answer = full[len(prompt):]
        target = answer.rstrip()
        segments += [(prompt[len(done):], False), (target, True), (answer[len(target):], False)]
        done = full
    if len(messages) > 0 and messages[-1]["role"] != "assistant":
        segments.append((render(len(messages), True)[len(done):], False))
    return [segment for segment in segments if segment[0] != ""]


SEGMENTS = {
    "plain": plain_segments,
    "vicuna_v1": vicuna_segments,
    "llama_3": llama_3_segments,
    "qwen_2": qwen_2_segments,
    "chatml": qwen_2_segments,
    "chat_template": chat_template_segments,
}


def _leading_special_ids(tokenizer, first_text: str) -> list[int]:
    """The ids the tokenizer puts before a text (e.g. [BOS]), unless the rendered text already starts with them."""
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token
    if bos and isinstance(first_text, str) and first_text.startswith(bos):
        return []
    return list(prefix)


def encode_conversation(
    conversations,
    tokenizer,
    template: str = "vicuna_v1",
    image_token_counts=(),
    image_token: str = "<image>",
    max_length: int | None = None,
    require_answer: bool = True,
) -> tuple[list[int], list[int]]:
    """A conversation -> (input_ids, labels) with each image placeholder expanded to its visual-token count.

    `image_token_counts[k]`: visual tokens of the k-th image (from the processor's image step). Labels are
    IGNORE_INDEX (-100) everywhere except the assistant answers (and their end token). Raises ConversationError for
    bad roles, a placeholder count that differs from the number of images, a placeholder in an answer, or a result
    longer than `max_length` (a sample is never cut: cutting could split an image's tokens).
    """
    check_template_name(template)
    turns = normalize_conversation(conversations, require_answer=require_answer)
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    segments = SEGMENTS[template](turns, tokenizer, image_token)
    input_ids = _leading_special_ids(tokenizer, segments[0][0] if segments else "")
    labels = [IGNORE_INDEX] * len(input_ids)
    for piece, is_target in segments:
        ids = [piece] if isinstance(piece, int) else tokenizer(piece, add_special_tokens=False)["input_ids"]
        if is_target and image_token_id in ids:
            raise ConversationError(f"an answer holds the image placeholder {image_token!r}; images go in human turns")
        input_ids += ids
        labels += ids if is_target else [IGNORE_INDEX] * len(ids)

    positions = [i for i, token in enumerate(input_ids) if token == image_token_id]
    counts = list(image_token_counts)
    if len(positions) != len(counts):
        raise ConversationError(
            f"the conversation holds {len(positions)} {image_token!r} placeholder(s) for {len(counts)} image(s)"
        )
    expanded_ids, expanded_labels, last = [], [], 0
    for position, count in zip(positions, counts):
        expanded_ids += input_ids[last:position] + [image_token_id] * count
        expanded_labels += labels[last:position] + [IGNORE_INDEX] * count
        last = position + 1
    expanded_ids += input_ids[last:]
    expanded_labels += labels[last:]
    if max_length is not None and len(expanded_ids) > max_length:
        raise ConversationError(
            f"the sample is {len(expanded_ids)} tokens long ({sum(counts)} visual) but max_length is {max_length}"
        )
    return expanded_ids, expanded_labels


# --- Jinja equivalents of the built-in templates, for inference (saved as the processor's chat template) ----------

MESSAGE_TEXT_JINJA = (  # a message's text: a string, or its parts with '<image>\n' per image

    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = namespace(value='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set text.value = text.value + '<image>\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = text.value -%}{%- endif -%}"
)


def _jinja_vicuna():
    return (
        "{%- if messages[0]['role'] != 'system' -%}{{ '" + VICUNA_SYSTEM.replace("'", "\\'") + " ' }}{%- endif -%}"
        "{%- for message in messages -%}" + MESSAGE_TEXT_JINJA +
        "{%- if message['role'] == 'system' -%}{{ text + ' ' }}"
        "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + text + ' ' }}"
        "{%- else -%}{{ 'ASSISTANT: ' + text + eos_token }}{%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


def _jinja_llama_3():
    return (
        "{%- if messages[0]['role'] != 'system' -%}"
        "{{ '<|start_header_id|>system<|end_header_id|>\n\n" + LLAMA_3_SYSTEM + "<|eot_id|>' }}{%- endif -%}"
        "{%- for message in messages -%}" + MESSAGE_TEXT_JINJA +
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + text | trim + '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
    )


def _jinja_qwen_2():
    return (
        "{%- if messages[0]['role'] != 'system' -%}"
        "{{ '<|im_start|>system\n" + QWEN_2_SYSTEM + "<|im_end|>\n' }}{%- endif -%}"
        "{%- for message in messages -%}" + MESSAGE_TEXT_JINJA +
        "{{ '<|im_start|>' + message['role'] + '\n' + text + '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    )


def _jinja_plain():
    # Pretraining format: the image placeholder(s) of the user turn, then the answer.
    return (
        "{%- for message in messages -%}" + MESSAGE_TEXT_JINJA +
        "{%- if message['role'] == 'user' -%}"
        "{%- for _ in range(text.count('<image>')) -%}{{ '<image>' }}{%- endfor -%}"
        "{%- elif message['role'] == 'assistant' -%}{{ text + '\n' }}{%- endif -%}"
        "{%- endfor -%}"
    )


def inference_chat_template(template: str, tokenizer=None) -> str | None:
    """The Jinja chat template that renders prompts as `template` does in training (None for `chat_template`:
    the tokenizer's own is kept). Without BOS: the processor's tokenizer adds it, as in training."""
    check_template_name(template)
    if template == "chat_template":
        return getattr(tokenizer, "chat_template", None)
    return {"plain": _jinja_plain, "vicuna_v1": _jinja_vicuna, "llama_3": _jinja_llama_3,
            "qwen_2": _jinja_qwen_2, "chatml": _jinja_qwen_2}[template]()


__all__ = [
    "IGNORE_INDEX",
    "TEMPLATE_NAMES",
    "ConversationError",
    "encode_conversation",
    "normalize_conversation",
    "prepare_tokenizer",
    "stop_token_ids",
    "inference_chat_template",
]
