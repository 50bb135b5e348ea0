"""Chat templates (Jinja, as shipped in tokenizer_config.json or GGUF metadata), rendered in a sandbox."""

from __future__ import annotations

from functools import lru_cache

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ferry.errors import InvalidRequestError


def _raise(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=8)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


def render_chat(
    template: str | None,
    messages: list[dict[str, str]],
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    if not template:
        raise InvalidRequestError("this model ships no chat template; run without --chat")
    try:
        return _compile(template).render(
            messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as exc:
        raise InvalidRequestError(f"chat template rejected the conversation: {exc}") from exc
