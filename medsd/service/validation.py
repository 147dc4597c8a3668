"""Request -> :class:`GenerationJob`, or every problem with the field it concerns.

Everything a request can get wrong is found here, before any queue or pipeline sees it, so a bad
request is a 4xx naming the field and never reaches the generator. No request field is ever used
as a path: labels, samplers and adapters are looked up by name in fixed lists.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medsd.config import ServeConfig
from medsd.labels import CHEXPERT_OBSERVATIONS, NO_FINDING
from medsd.prompts import PromptParts, format_prompt
from medsd.service.batching import BatchKey, GenerationJob
from medsd.service.schema import Catalog, FieldError, GenerateRequest

# Bound on how much of a bad value an error message repeats back.
ECHO_CHARS = 40
BODY_FIELD = "body"


@dataclass(frozen=True)
class FieldProblem:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class InvalidRequest(ValueError):
    """A request with one or more problems; ``str()`` is one line naming every field."""

    def __init__(self, problems: Sequence[FieldProblem]):
        self.problems = list(problems)
        super().__init__("; ".join(str(problem) for problem in self.problems))

    def field_errors(self) -> list[FieldError]:
        return [FieldError(field=problem.field, message=problem.message) for problem in self.problems]


def resolve_request(
    request: GenerateRequest, catalog: Catalog, cfg: ServeConfig, draw_seed: Callable[[], int]
) -> GenerationJob:
    """Check ``request`` against the served model and the limits of ``cfg``; the job to run.

    ``draw_seed`` supplies the seed of a request that gives none. InvalidRequest lists every problem.
    """
    problems: list[FieldProblem] = []
    prompt = _resolve_prompt(request, cfg, problems)
    negative_prompt = _check_text("negative_prompt", request.negative_prompt or "", cfg, problems, allow_empty=True)
    if request.format == "png" and request.num_images > 1:
        problems.append(
            FieldProblem("format", f"'png' returns one image; use 'json' for num_images={request.num_images}")
        )
    sampler = request.sampler if request.sampler is not None else catalog.default_sampler
    if sampler not in catalog.samplers:
        problems.append(FieldProblem("sampler", f"{_echo(sampler)} is not served; expected one of {catalog.samplers}"))
    height, width = _resolve_size(request, catalog, problems)
    adapter_names = [adapter.name for adapter in catalog.adapters]
    if request.adapter is not None and request.adapter not in adapter_names:
        known = ", ".join(adapter_names) or "none are loaded"
        problems.append(FieldProblem("adapter", f"{_echo(request.adapter)} is not loaded; expected one of: {known}"))
    if problems:
        raise InvalidRequest(problems)

    first_seed = request.seed if request.seed is not None else draw_seed()
    key = BatchKey(
        height=height,
        width=width,
        steps=request.steps if request.steps is not None else catalog.default_steps,
        sampler=sampler,
        guidance_scale=request.guidance_scale if request.guidance_scale is not None else catalog.default_guidance_scale,
        negative_prompt=negative_prompt,
        adapter=request.adapter,
    )
    seeds = tuple(first_seed + offset for offset in range(request.num_images))
    return GenerationJob(prompt=prompt, seeds=seeds, key=key)


def _resolve_prompt(request: GenerateRequest, cfg: ServeConfig, problems: list[FieldProblem]) -> str:
    """The prompt text: the request's own, or medsd's wording of its labels (prompts.format_prompt)."""
    if request.prompt is not None and request.labels is not None:
        problems.append(FieldProblem("prompt", "give either prompt or labels, not both"))
        return ""
    if request.prompt is None and request.labels is None:
        problems.append(FieldProblem("prompt", "give either prompt (free text) or labels (see GET /v1/labels)"))
        return ""
    if request.prompt is not None:
        for name in ("view", "projection"):
            if getattr(request, name) is not None:
                problems.append(FieldProblem(name, "only applies with labels; write it into the prompt instead"))
        return _check_text("prompt", request.prompt, cfg, problems, allow_empty=False)

    findings = _check_labels(request.labels, problems)
    if request.projection is not None and request.view != "Frontal":
        problems.append(FieldProblem("projection", f"{request.projection} needs view 'Frontal'"))
    if findings is None or problems:
        return ""
    return format_prompt(PromptParts(findings=findings, view=request.view, projection=request.projection))


def _check_labels(labels: Sequence[str], problems: list[FieldProblem]) -> tuple[str, ...] | None:
    """Findings in schema order, or None after recording problems (unknown, repeated, No Finding with others)."""
    before = len(problems)
    for index, label in enumerate(labels):
        if label not in CHEXPERT_OBSERVATIONS:
            problems.append(FieldProblem(f"labels[{index}]", f"unknown observation {_echo(label)}; see GET /v1/labels"))
        elif labels.index(label) != index:
            problems.append(FieldProblem(f"labels[{index}]", f"{label!r} is given twice"))
    if NO_FINDING in labels and len(set(labels)) > 1:
        problems.append(FieldProblem("labels", f"{NO_FINDING!r} cannot be combined with findings"))
    if len(problems) > before:
        return None
    return tuple(o for o in CHEXPERT_OBSERVATIONS if o in labels and o != NO_FINDING)


def _check_text(field: str, text: str, cfg: ServeConfig, problems: list[FieldProblem], *, allow_empty: bool) -> str:
    """Stripped ``text`` after recording problems: empty, too long, or control characters."""
    text = text.strip()
    if not text and not allow_empty:
        problems.append(FieldProblem(field, "must not be empty"))
    if len(text) > cfg.max_prompt_chars:
        problems.append(FieldProblem(field, f"{len(text)} characters; at most {cfg.max_prompt_chars}"))
    # Control characters have no meaning to the text encoder and would end up in PNG text chunks.
    control = sorted({f"U+{ord(c):04X}" for c in text if unicodedata.category(c) in ("Cc", "Cs")})
    if control:
        problems.append(FieldProblem(field, f"contains control characters {', '.join(control[:5])}"))
    return text


def _resolve_size(request: GenerateRequest, catalog: Catalog, problems: list[FieldProblem]) -> tuple[int, int]:
    """(height, width): the request's, each defaulting to the model's first size; must be a served size."""
    default_height, default_width = catalog.sizes[0]
    height = request.height if request.height is not None else default_height
    width = request.width if request.width is not None else default_width
    if (height, width) not in [tuple(size) for size in catalog.sizes]:
        supported = ", ".join(f"{h}x{w}" for h, w in catalog.sizes)
        field = "height" if request.height is not None else "width"
        problems.append(FieldProblem(field, f"{height}x{width} (height x width) is not served; expected {supported}"))
    return height, width


def problems_from_validation_errors(errors: Iterable[Mapping[str, Any]]) -> list[FieldProblem]:
    """FastAPI / pydantic error dicts -> problems named by request field ('labels[1]', 'body')."""
    problems = []
    for error in errors:
        location = [part for part in error.get("loc", ()) if part != BODY_FIELD]
        if error.get("type") == "json_invalid":
            location = []  # its location is a character offset, not a field
        problems.append(FieldProblem(_field_name(location), _readable_message(error)))
    return problems or [FieldProblem(BODY_FIELD, "invalid request")]


def _field_name(location: Sequence[Any]) -> str:
    name = ""
    for part in location:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or BODY_FIELD


def _readable_message(error: Mapping[str, Any]) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "unknown field; see the GenerateRequest schema at /docs"
    if kind == "json_invalid":
        return f"not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
    if kind == "model_attributes_type" or kind == "dict_type":
        return "expected a JSON object (Content-Type: application/json)"
    message = str(error.get("msg", "invalid value"))
    if "input" in error and isinstance(error["input"], (str, int, float, bool)) and kind != "missing":
        message += f" (got {_echo(error['input'])})"
    return message


def _echo(value: object) -> str:
    """``value`` as repr, cut to ECHO_CHARS so an error never mirrors a huge input."""
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else text[: ECHO_CHARS - 3] + "..."
