"""The HTTP API's bodies and answers (pydantic): what OpenAPI at /docs shows."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

REQUEST_FIELDS = ("prompt", "negative_prompt", "model", "width", "height", "steps", "guidance", "seed",
                  "num_images", "priority", "sku_id", "callback_url", "deadline", "metadata")


class GenerationBody(BaseModel):
    """A request to render. The caps are the pipeline's (ZIMAGE_MAX_* settings); the tenant is the API key's."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What to render; not blank.")
    negative_prompt: str | None = None
    model: str = "z-image-turbo"
    width: StrictInt = Field(1024, description="A multiple of 16.")
    height: StrictInt = Field(1024, description="A multiple of 16.")
    steps: StrictInt = 8
    guidance: StrictFloat | StrictInt = 0.0
    seed: StrictInt | None = Field(None, description="Image i uses seed + i; none: derived from the request id.")
    num_images: StrictInt = 1
    priority: Literal["high", "normal", "low"] = "normal"
    sku_id: str | None = None
    callback_url: str | None = Field(None, description="Called (signed) with the outcome, in async mode.")
    deadline: StrictInt | None = Field(None, description="Epoch milliseconds; fails the request once passed.")
    metadata: dict[str, str] = Field(default_factory=dict)
    tenant: str | None = Field(None, description="Optional; when given it must be the API key's own tenant.")
    mode: Literal["async", "sync"] = Field(
        "async", description="sync: answer with the image (or 202 after timeout_s); async: 202 at once.")
    timeout_s: float | None = Field(None, gt=0, description="How long sync mode waits (capped by the server).")

    def request_fields(self) -> dict[str, Any]:
        fields = {name: getattr(self, name) for name in REQUEST_FIELDS}
        fields["priority"] = self.priority.upper()
        return fields


class ImageOut(BaseModel):
    index: int
    url: str | None = Field(description="A presigned HTTPS (or CDN) URL; null where the store has none.")
    sha256: str
    seed: int


class ErrorOut(BaseModel):
    code: str
    message: str


class Task(BaseModel):
    id: str
    tenant: str
    state: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    status: str | None = Field(None, description="The pipeline's latest status (admitted, published, ...).")
    final: bool = False
    detail: str | None = None
    position: int | None = Field(None, description="Place in the queue, where known (not reported yet).")
    cancel_requested: bool = False
    url: str | None = Field(None, description="The first image's URL, once completed.")
    seed: int | None = None
    images: list[ImageOut] = Field(default_factory=list)
    error: ErrorOut | None = None
    accepted_at: int | None = None
    status_url: str


class Accepted(BaseModel):
    id: str
    state: str
    status_url: str


class TaskPage(BaseModel):
    tasks: list[Task]
    next_before: float | None = Field(None, description="Pass as `before` for the next (older) page.")
    next_before_id: str | None = Field(None, description="Pass as `before_id` with `before`: the page ends at this "
                                       "task, and tasks accepted in the same millisecond are not skipped.")
