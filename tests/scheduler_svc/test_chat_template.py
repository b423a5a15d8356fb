"""Chat prompts through the model's chat template: the embedded model's, an override file, and none."""

from __future__ import annotations

import pytest

from pagedserve.default_model import default_model_dir
from pagedserve.errors import InvalidArgumentError
from scheduler_svc.chat_template import ChatRenderer, load_chat_template
from scheduler_svc.tokenizer import encode_prompt, load_tokenizer

MESSAGES = [{"role": "system", "content": "Python 3"},
            {"role": "user", "content": "read a file\nline by line"},
            {"role": "assistant", "content": "with open(path) as f:"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_dir())


def test_the_embedded_template_writes_comments_then_code(tokenizer):
    renderer = ChatRenderer(tokenizer)
    expected = "<s># Python 3\n# read a file\n# line by line\nwith open(path) as f:\n"
    assert renderer.render(MESSAGES) == expected


def test_the_rendered_prompt_is_what_a_completion_of_its_text_would_get(tokenizer):
    # The template writes BOS itself, so the chat prompt equals the completion prompt of the same text.
    renderer = ChatRenderer(tokenizer)
    text = renderer.render(MESSAGES).removeprefix("<s>")
    assert renderer.encode(MESSAGES) == encode_prompt(tokenizer, text)


def test_the_tokenizers_own_behaviour_is_unchanged(tokenizer):
    ids = encode_prompt(tokenizer, "def f(x):")
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == "def f(x):"


def test_an_override_file_replaces_the_models_template(tokenizer, tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}|{% endfor %}")
    renderer = ChatRenderer(tokenizer, load_chat_template(str(path)))
    assert renderer.render(MESSAGES[:1]) == "[system] Python 3|"


def test_no_template_and_a_bad_file_are_refused_by_name(tokenizer, tmp_path):
    renderer = ChatRenderer(tokenizer)
    renderer.template = None            # as for a model without one
    with pytest.raises(InvalidArgumentError) as caught:
        renderer.render(MESSAGES)
    assert caught.value.field == "messages" and "--chat-template" in caught.value.message
    with pytest.raises(InvalidArgumentError) as caught:
        load_chat_template(str(tmp_path / "missing.jinja"))
    assert caught.value.field == "chat_template"
    assert load_chat_template("") is None


def test_a_template_that_fails_names_the_messages(tokenizer):
    renderer = ChatRenderer(tokenizer, "{{ raise_exception('only user messages') }}")
    with pytest.raises(InvalidArgumentError, match="only user messages") as caught:
        renderer.render(MESSAGES)
    assert caught.value.field == "messages"
