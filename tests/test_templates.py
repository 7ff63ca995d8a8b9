"""Conversation templates: token-by-token input_ids and labels for every template, built independently in the test
from literal strings tokenized piece by piece, with the assistant spans marked by hand."""

import pytest

from multigran.data.templates import (
    ConversationError,
    encode_conversation,
    inference_chat_template,
    prepare_tokenizer,
    stop_token_ids,
)
from multigran.tiny import build_tiny_tokenizer

IMAGE_ID = 4  # "<image>" in the tiny tokenizer
BOS, EOS = 1, 2

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat is shown in this image?"},
    {"from": "gpt", "value": "A red square."},
    {"from": "human", "value": "How many objects are there?"},
    {"from": "gpt", "value": "One."},
]
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")


@pytest.fixture()
def tokenizer():
    return build_tiny_tokenizer()  # fresh: some tests add tokens


def expected(tokenizer, pieces, image_count):
    """pieces: literal (text, is_answer) pairs, or ("<IMG>", False) for the image; -> (ids, labels)."""
    ids, labels = [], []
    for text, is_answer in pieces:
        if text == "<IMG>":
            part = [IMAGE_ID] * image_count
        elif isinstance(text, int):
            part = [text]
        else:
            part = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if is_answer else [-100] * len(part)
    return ids, labels


def check_equal(actual, wanted):
    ids, labels = actual
    want_ids, want_labels = wanted
    assert len(ids) == len(want_ids)
    for position, (a, b) in enumerate(zip(ids, want_ids)):
        assert a == b, f"token {position}: {a} != {b}"
    for position, (a, b) in enumerate(zip(labels, want_labels)):
        assert a == b, f"label {position}: {a} != {b}"


def test_vicuna_v1_token_by_token(tokenizer):
    actual = encode_conversation(CONVERSATION, tokenizer, "vicuna_v1", image_token_counts=[5])
    wanted = expected(tokenizer, [
        (BOS, False),
        (VICUNA_SYSTEM + " USER: ", False), ("<IMG>", False), ("\nWhat is shown in this image? ASSISTANT:", False),
        (" A red square.", True), (EOS, True),
        ("USER: How many objects are there? ASSISTANT:", False),
        (" One.", True), (EOS, True),
    ], image_count=5)
    check_equal(actual, wanted)
    ids, labels = actual
    assert tokenizer.decode([t for t, l in zip(ids, labels) if l != -100]) == " A red square.</s> One.</s>"


def test_llama_3_token_by_token(tokenizer):
    assert "<|eot_id|>" not in tokenizer.get_vocab()
    added = prepare_tokenizer(tokenizer, "llama_3")
    assert added == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    for token in added:  # each one token now
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    system = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
              "the user provides, and assist the user with a variety of tasks using natural language.")
    actual = encode_conversation(CONVERSATION, tokenizer, "llama_3", image_token_counts=[3])
    wanted = expected(tokenizer, [
        (BOS, False),
        ("<|start_header_id|>system<|end_header_id|>\n\n" + system + "<|eot_id|>", False),
        ("<|start_header_id|>user<|end_header_id|>\n\n", False), ("<IMG>", False),
        ("\nWhat is shown in this image?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("A red square.", True), (eot, True),
        ("<|start_header_id|>user<|end_header_id|>\n\nHow many objects are there?<|eot_id|>", False),
        ("<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("One.", True), (eot, True),
    ], image_count=3)
    check_equal(actual, wanted)
    assert stop_token_ids(tokenizer, "llama_3") == [EOS, eot]


def test_qwen_2_token_by_token(tokenizer):
    prepare_tokenizer(tokenizer, "qwen_2")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    conversation = [{"from": "system", "value": "Be brief."}] + CONVERSATION
    actual = encode_conversation(conversation, tokenizer, "qwen_2", image_token_counts=[2])
    wanted = expected(tokenizer, [
        (BOS, False),  # the tiny tokenizer adds <s>; Qwen2's adds nothing
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n", False), ("<IMG>", False),
        ("\nWhat is shown in this image?<|im_end|>\n<|im_start|>assistant\n", False),
        ("A red square.", True), (im_end, True),
        ("\n<|im_start|>user\nHow many objects are there?<|im_end|>\n<|im_start|>assistant\n", False),
        ("One.", True), (im_end, True), ("\n", False),
    ], image_count=2)
    check_equal(actual, wanted)
    # chatml is the same template
    assert encode_conversation(conversation, tokenizer, "chatml", image_token_counts=[2]) == actual


def test_tokenizer_chat_template_token_by_token(tokenizer):
    # The tiny tokenizer's own template: "USER: q ASSISTANT: a</s> " per round.
    actual = encode_conversation(CONVERSATION, tokenizer, "chat_template", image_token_counts=[4])
    wanted = expected(tokenizer, [
        (BOS, False),
        ("USER: ", False), ("<IMG>", False), ("\nWhat is shown in this image? ASSISTANT:", False),
        (" A red square.", True), (EOS, True), (" ", False),
        ("USER: How many objects are there? ASSISTANT:", False),
        (" One.", True), (EOS, True), (" ", False),
    ], image_count=4)
    check_equal(actual, wanted)


@pytest.mark.parametrize("template", ["vicuna_v1", "llama_3", "qwen_2"])
def test_jinja_chat_template_reproduces_builtin(tokenizer, template):
    # Two independent implementations: the built-in segments vs. rendering our inference Jinja incrementally.
    prepare_tokenizer(tokenizer, template)
    builtin = encode_conversation(CONVERSATION, tokenizer, template, image_token_counts=[3])
    tokenizer.chat_template = inference_chat_template(template)
    assert encode_conversation(CONVERSATION, tokenizer, "chat_template", image_token_counts=[3]) == builtin


@pytest.mark.parametrize("template", ["vicuna_v1", "llama_3", "qwen_2", "plain"])
def test_inference_prompt_matches_training_prompt(tokenizer, template):
    # What the processor tokenizes at inference (rendered prompt + generation prompt, special tokens added) equals the
    # training ids up to the first answer token.
    prepare_tokenizer(tokenizer, template)
    conversation = CONVERSATION[:2]
    ids, labels = encode_conversation(conversation, tokenizer, template, image_token_counts=[1])
    first_answer = next(i for i, label in enumerate(labels) if label != -100)
    messages = [{"role": "user", "content": CONVERSATION[0]["value"]}]
    prompt = tokenizer.apply_chat_template(messages, chat_template=inference_chat_template(template), tokenize=False,
                                           add_generation_prompt=True)
    assert tokenizer(prompt, add_special_tokens=True)["input_ids"] == ids[:first_answer]


def test_plain_token_by_token(tokenizer):
    conversation = [{"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "A red square."}]
    actual = encode_conversation(conversation, tokenizer, "plain", image_token_counts=[6])
    wanted = expected(tokenizer, [(BOS, False), ("<IMG>", False), ("A red square.\n", True)], image_count=6)
    check_equal(actual, wanted)
    with pytest.raises(ConversationError, match="one human turn and one gpt turn"):
        encode_conversation(CONVERSATION, tokenizer, "plain", image_token_counts=[6])


def test_system_turn_replaces_default(tokenizer):
    ids, _ = encode_conversation([{"from": "system", "value": "Be brief."}] + CONVERSATION[:2], tokenizer,
                                 "vicuna_v1", image_token_counts=[1])
    text = tokenizer.decode(ids)
    assert text.startswith("<s>Be brief. USER: <image>") and "curious human" not in text


@pytest.mark.parametrize("conversation, message", [
    ([], "empty"),
    ([{"from": "gpt", "value": "hi"}], "turn 0 is from the assistant"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "turn 1 is from the user"),
    ([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], "role 'bot'"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": 3}], "int value"),
    ([{"from": "human", "value": "a"}], "ends with a human turn"),
    ([{"from": "system", "value": "s"}], "only a system turn"),
])
def test_bad_conversations_raise(tokenizer, conversation, message):
    with pytest.raises(ConversationError, match=message):
        encode_conversation(conversation, tokenizer, "vicuna_v1")


def test_image_count_mismatch_and_image_in_answer_raise(tokenizer):
    with pytest.raises(ConversationError, match=r"1 '<image>' placeholder\(s\) for 2 image"):
        encode_conversation(CONVERSATION, tokenizer, "vicuna_v1", image_token_counts=[3, 3])
    bad = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image> a"}]
    with pytest.raises(ConversationError, match="answer holds the image placeholder"):
        encode_conversation(bad, tokenizer, "vicuna_v1", image_token_counts=[1])


def test_too_long_raises_never_cuts(tokenizer):
    ids, _ = encode_conversation(CONVERSATION, tokenizer, "vicuna_v1", image_token_counts=[50])
    assert encode_conversation(CONVERSATION, tokenizer, "vicuna_v1", [50], max_length=len(ids))[0] == ids
    with pytest.raises(ConversationError, match=f"{len(ids)} tokens long \\(50 visual\\) but max_length is"):
        encode_conversation(CONVERSATION, tokenizer, "vicuna_v1", [50], max_length=len(ids) - 1)


def test_non_incremental_chat_template_raises(tokenizer):
    tokenizer.chat_template = ("{{ messages | length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    with pytest.raises(ConversationError, match="does not render conversations incrementally"):
        encode_conversation(CONVERSATION, tokenizer, "chat_template", image_token_counts=[1])


def test_unknown_template_and_missing_chat_template(tokenizer):
    with pytest.raises(ValueError, match="unknown conversation template 'alpaca'"):
        encode_conversation(CONVERSATION, tokenizer, "alpaca", image_token_counts=[1])
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has none"):
        prepare_tokenizer(tokenizer, "chat_template")


def test_chat_template_that_is_the_saved_plain_template_is_refused(tokenizer):
    # What a stage-1 run leaves in its processor: naming "chat_template" in stage 2 would drop every question.
    tokenizer.chat_template = inference_chat_template("plain")
    with pytest.raises(ValueError, match="is the `plain` pretraining one"):
        prepare_tokenizer(tokenizer, "chat_template")
    assert prepare_tokenizer(tokenizer, "vicuna_v1") == []  # naming the conversation template is fine
