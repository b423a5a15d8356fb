"""Chat prompts: messages rendered with the model's chat template into prompt token ids.

The template is the model directory's (`chat_template` in tokenizer_config.json, which the tokenizer
loads), or the Jinja file given with `--chat-template`. Rendering goes through transformers'
`apply_chat_template`, so a template behaves as it does for the model elsewhere. A template writes
the special tokens it wants (BOS, role markers) itself, so the rendered text is tokenized without
adding any (as vLLM and transformers do for chat prompts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pagedserve.errors import InvalidArgumentError


def load_chat_template(path: str) -> str | None:
    """The template in `path`, or None for no override (""); raises InvalidArgumentError naming
    chat_template when the file cannot be read."""
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidArgumentError("chat_template", f"cannot read the template file {path!r}: {err}") from err


class ChatRenderer:
    """Renders conversations for one tokenizer; call its methods on the tokenizer thread."""

    def __init__(self, tokenizer: Any, override: str | None = None) -> None:
        self._tokenizer = tokenizer
        self.template = override or getattr(tokenizer, "chat_template", None) or None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               template_kwargs: dict[str, Any] | None = None) -> str:
        """The prompt text of `messages`; InvalidArgumentError when there is no template or it fails."""
        if self.template is None:
            raise InvalidArgumentError(
                "messages", "this model has no chat template (no chat_template in its "
                "tokenizer_config.json); start the server with --chat-template FILE, or send the prompt to "
                "/v1/completions")
        try:
            text = self._tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False,
                add_generation_prompt=add_generation_prompt, **(template_kwargs or {}))
        except Exception as err:    # jinja2 raises its own errors, and templates raise on purpose
            raise InvalidArgumentError("messages", f"the chat template cannot render them: {err}") from err
        return str(text)

    def encode(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """The prompt token ids of `messages` (the template's special tokens, none added)."""
        text = self.render(messages, add_generation_prompt, template_kwargs)
        return list(self._tokenizer(text, add_special_tokens=False).input_ids)
