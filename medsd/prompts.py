"""Label rows <-> prompt text. The only place a prompt is formatted or parsed.

"a frontal PA chest x-ray showing cardiomegaly and pleural effusion", "a lateral chest x-ray with no
finding", "a frontal AP chest x-ray showing edema and possible atelectasis" (an uncertain mention, when the
caller asks for it). Deterministic: the same row, policy and identifier always give the same words, with findings
in schema order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from medsd.labels import (
    CHEXPERT_OBSERVATIONS,
    NO_FINDING,
    POSITIVE,
    PROJECTION_COLUMN,
    PROJECTIONS,
    UNCERTAIN,
    VIEW_COLUMN,
    VIEWS,
    UncertaintyPolicy,
)

SUBJECT = "chest x-ray"
NO_FINDING_PHRASE = "with no finding"
UNCERTAIN_WORD = "possible"  # how reports hedge, and what CheXpert's labeler reads as uncertain (-1)


@dataclass(frozen=True)
class PromptParts:
    """What a prompt says: the positive findings (schema names), the view and the projection, and the
    findings it names as only possible (uncertain)."""

    findings: tuple[str, ...]
    view: str | None = None
    projection: str | None = None
    identifier: str | None = None
    uncertain: tuple[str, ...] = ()


def positive_findings(
    labels: Mapping[str, float],
    policy: UncertaintyPolicy | str = UncertaintyPolicy.IGNORE,
    observations: Sequence[str] = CHEXPERT_OBSERVATIONS,
) -> tuple[str, ...]:
    """Observations (schema order, No Finding excluded) that a prompt names as present.

    Uncertain (-1) counts as present only under U-Ones; U-Ignore and U-Zeros leave it unnamed,
    because a prompt has no way to say "maybe".
    """
    policy = UncertaintyPolicy(policy)
    present = []
    for observation in observations:
        if observation == NO_FINDING:
            continue
        value = _as_float(labels.get(observation))
        if value == POSITIVE or (value == UNCERTAIN and policy is UncertaintyPolicy.ONES):
            present.append(observation)
    return tuple(present)


def uncertain_findings(
    labels: Mapping[str, float],
    policy: UncertaintyPolicy | str = UncertaintyPolicy.IGNORE,
    observations: Sequence[str] = CHEXPERT_OBSERVATIONS,
) -> tuple[str, ...]:
    """Observations (schema order) whose label is uncertain (-1) and that U-Ones does not already name."""
    if UncertaintyPolicy(policy) is UncertaintyPolicy.ONES:
        return ()
    return tuple(o for o in observations if o != NO_FINDING and _as_float(labels.get(o)) == UNCERTAIN)


def format_prompt(parts: PromptParts) -> str:
    """PromptParts -> text, e.g. 'a sks frontal PA chest x-ray showing edema'."""
    if parts.view is not None and parts.view not in VIEWS:
        raise ValueError(f"view {parts.view!r}: expected one of {', '.join(VIEWS)}")
    if parts.projection is not None and parts.projection not in PROJECTIONS:
        raise ValueError(f"projection {parts.projection!r}: expected one of {', '.join(PROJECTIONS)}")
    if parts.identifier is not None and not re.fullmatch(r"[^\s,]+", parts.identifier):
        raise ValueError(f"identifier {parts.identifier!r}: expected one word without spaces or commas")
    words = ["a"]
    if parts.identifier:
        words.append(parts.identifier)
    if parts.view:
        words.append(parts.view.lower())
        # A projection only makes sense for a frontal view; CheXpert leaves it blank on laterals.
        if parts.projection and parts.view == "Frontal":
            words.append(parts.projection)
    words.append(SUBJECT)
    named = [f.lower() for f in parts.findings] + [f"{UNCERTAIN_WORD} {f.lower()}" for f in parts.uncertain]
    if named:
        words.append("showing " + _join_findings(named))
    else:
        words.append(NO_FINDING_PHRASE)
    return " ".join(words)


def prompt_for_labels(
    labels: Mapping[str, float],
    *,
    policy: UncertaintyPolicy | str = UncertaintyPolicy.IGNORE,
    identifier: str | None = None,
    observations: Sequence[str] = CHEXPERT_OBSERVATIONS,
    include_view: bool = True,
    name_uncertain: bool = False,
) -> str:
    """A label row (observation -> raw value, plus optional 'Frontal/Lateral' and 'AP/PA') -> prompt.

    ``name_uncertain``: uncertain findings are worded 'possible <finding>' rather than left unnamed (under
    U-Ones they are named as present either way).
    """
    view = _as_text(labels.get(VIEW_COLUMN)) if include_view else None
    projection = _as_text(labels.get(PROJECTION_COLUMN)) if include_view else None
    uncertain = uncertain_findings(labels, policy, observations) if name_uncertain else ()
    parts = PromptParts(positive_findings(labels, policy, observations), view, projection, identifier, uncertain)
    return format_prompt(parts)


def parse_prompt(prompt: str, observations: Sequence[str] = CHEXPERT_OBSERVATIONS) -> PromptParts:
    """Invert :func:`format_prompt`; ValueError naming the part that is not medsd's prompt grammar."""
    pattern = (
        r"a (?:(?P<identifier>\S+) )??(?:(?P<view>frontal|lateral) )?(?:(?P<projection>AP|PA|LL|RL) )?"
        + re.escape(SUBJECT)
        + r" (?:showing (?P<findings>.+)|"
        + re.escape(NO_FINDING_PHRASE)
        + ")"
    )
    match = re.fullmatch(pattern, prompt.strip())
    if match is None:
        raise ValueError(f"prompt {prompt!r}: not of the form 'a [view] [AP/PA] {SUBJECT} showing ...'")
    by_lower = {o.lower(): o for o in observations}
    findings: list[str] = []
    uncertain: list[str] = []
    if match["findings"]:
        for phrase in re.split(r", | and ", match["findings"]):
            name = phrase.removeprefix(UNCERTAIN_WORD + " ")
            if name not in by_lower:
                raise ValueError(f"prompt {prompt!r}: unknown finding {name!r}")
            (uncertain if name != phrase else findings).append(by_lower[name])
    view = match["view"].capitalize() if match["view"] else None
    return PromptParts(tuple(findings), view, match["projection"], match["identifier"], tuple(uncertain))


def _join_findings(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _as_float(value: object) -> float:
    if value is None or value == "":
        return math.nan
    return float(value)


def _as_text(value: object) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    return str(value)
