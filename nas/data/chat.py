"""Chat data: conversations (`messages`) rendered to text with a tokenizer's chat template, and, for
`mask_prompt`, which of the rendered tokens are the assistant's (the only ones trained on then).

The assistant's spans come from rendering prefixes: the conversation up to an assistant turn with the
generation prompt, and up to the end of that turn; the characters between them are the turn (its
content and the template's end-of-turn marker). This needs a template whose render of a conversation
starts with the render of each of its prefixes, as ChatML-style templates do; a record where that does
not hold cannot be masked and is skipped (counted like a record the template cannot render).
Written here rather than with transformers' `return_assistant_tokens_mask`, which needs `{% generation %}`
markers that few released templates carry.
"""

from __future__ import annotations

import hashlib
from typing import Any

from nas.errors import DataError
from nas.settings import Source


class RenderedChat(str):
    """A rendered conversation (the text) with the character spans of its assistant turns."""

    spans: tuple[tuple[int, int], ...] = ()


def chat_template(tokenizer: Any, source: Source) -> str:
    """The Jinja text of the chat template a chat source is rendered with: the tokenizer's own, or
    `source.chat_template` (one of the tokenizer's named templates, or a Jinja template itself)."""
    try:
        return tokenizer.get_chat_template(source.chat_template)
    except (ValueError, AttributeError) as e:
        raise DataError(
            f"{source.path} is chat data but {str(e).splitlines()[0]}; give the template with chat_template "
            "(--chat-template): a template name of the tokenizer's or a Jinja template"
        ) from None


def template_label(source: Source, template: str) -> str:
    """How records name the template of a chat source: its name (or 'tokenizer' / 'jinja') and hash."""
    name = source.chat_template or "tokenizer"
    if source.chat_template is not None and source.chat_template == template:  # given as Jinja text
        name = "jinja"
    return f"{name} (sha1 {hashlib.sha1(template.encode()).hexdigest()[:12]})"


def chat_renderer(tokenizer: Any, source: Source):
    """messages -> the conversation as text, rendered by the chat template (no generation prompt: the
    conversation is a finished document; special tokens are in the text and tokenized as such); with
    `mask_prompt`, a `RenderedChat` that knows its assistant spans."""
    template = chat_template(tokenizer, source)

    def render(messages: list, prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, chat_template=template, add_generation_prompt=prompt
        )

    def render_spans(messages: list) -> RenderedChat:
        text = RenderedChat(render(messages))
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            start, end = render(messages[:i], prompt=True) if i else "", render(messages[: i + 1])
            if not (end.startswith(start) and text.startswith(end)):
                raise ValueError("the template does not render the conversation's turns as prefixes of it")
            spans.append((len(start), len(end)))
        text.spans = tuple(spans)
        return text

    return render_spans if source.mask_prompt else render


def token_mask(offsets: list[tuple[int, int]], spans: tuple[tuple[int, int], ...]) -> list[int]:
    """1 for each token (by its character offsets) that starts inside an assistant span, else 0."""
    return [int(any(s <= start < e for s, e in spans)) for start, _ in offsets]
