"""The OpenAI-compatible request bodies the device agent accepts, and OpenAI-style errors.

Requests are validated with pydantic; a field of the wrong type or out of range becomes a 400 with
``{"error": {"message", "type": "invalid_request_error", "param", "code"}}`` naming the field, as the
OpenAI API answers. Fields the agent cannot honour (``n > 1``, ``logprobs``, ``echo``, tools) are refused
the same way rather than silently ignored; unknown extra fields (``user``, ``metadata``...) are ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lambdasplit.diffusion.protocol import Policy
from lambdasplit.errors import ConfigError
from lambdasplit.generation import SamplingParams
from lambdasplit.wire import WireDtype


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, "only text content parts are supported", param="messages", code="unsupported")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Sampling(BaseModel):
    """The sampling fields shared by chat and text completions (OpenAI's names and defaults)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool | int | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop is a non-empty string or a list of up to 4 non-empty strings")
        return v

    def check_supported(self) -> None:
        if self.n != 1:
            raise ApiError(400, "only n = 1 is supported", param="n", code="unsupported")
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs", code="unsupported")
        if self.frequency_penalty or self.presence_penalty:
            raise ApiError(400, "frequency_penalty and presence_penalty are not supported", param="frequency_penalty")

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p if self.top_p < 1.0 else None,
            seed=self.seed,
            stop=tuple(stops),
        )


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise ApiError(400, "tools are not supported", param="tools", code="unsupported")

    def chat(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ApiError(400, "exactly one prompt per request is supported", param="prompt", code="unsupported")
        if self.echo or self.suffix:
            raise ApiError(400, "echo and suffix are not supported", param="echo", code="unsupported")

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(x) for x in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {message}" if param else message, param=param) from exc
    if isinstance(request, _Sampling):
        request.check_supported()
    return request


class ImageRequest(BaseModel):
    """``POST /v1/images/generations``: OpenAI's fields, and lambdasplit's own for the split (``extra_body``)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = 1
    size: str | None = None  # "auto" or the pipeline's own "WxH"
    response_format: str | None = None  # only b64_json: the agent keeps no images to link to
    output_format: str | None = None  # only png
    stream: bool = False
    partial_images: int | None = Field(default=None, ge=0)
    # lambdasplit's own
    steps: int = Field(default=20, ge=1, le=1000)
    seed: int = 0
    guidance_scale: float = Field(default=4.0, ge=0.0)
    negative_prompt: str | None = None
    policy: Policy = "paper"
    wire_dtype: str = "float16"  # any name WireDtype.parse takes
    cut_ratio: float = Field(default=0.5, ge=0.0, le=1.0)
    blocks: int = Field(default=1, ge=1)
    preview_every: int | None = Field(default=None, ge=1)

    @field_validator("wire_dtype")
    @classmethod
    def _wire_dtype(cls, v: str) -> str:
        try:
            return WireDtype.parse(v).name.lower()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    def check_supported(self, native_size: str) -> None:
        if self.n != 1:
            raise ApiError(400, "only n = 1 is supported", param="n", code="unsupported")
        if self.response_format not in (None, "b64_json"):
            raise ApiError(
                400, "only response_format b64_json is supported: the agent keeps no images to link to",
                param="response_format", code="unsupported",
            )  # fmt: skip
        if self.output_format not in (None, "png"):
            raise ApiError(400, "only output_format png is supported", param="output_format", code="unsupported")
        if self.size not in (None, "auto", native_size):
            raise ApiError(
                400, f"this pipeline draws {native_size} images; size is {native_size} or auto, got {self.size!r}",
                param="size", code="unsupported",
            )  # fmt: skip

    def every(self) -> int:
        """Steps between previews when streaming: ``preview_every``, else ``partial_images`` spread evenly."""
        if self.preview_every is not None:
            return self.preview_every
        if self.partial_images:
            return max(1, -(-self.steps // (self.partial_images + 1)))
        return 0  # no previews
