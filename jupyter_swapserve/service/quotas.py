"""Per-user quotas: validation of quota rows, the effective limits of a user on a model, and the
admission decision. Pure functions over plain values; state (usage, windows) lives elsewhere.

A quota row holds any subset of the fields below. The default row (user ``*``) applies to
everyone; a user's row overrides it field by field (``null`` or absent: inherit the default).
In the default row ``null`` means no limit. A row's ``models`` map adds limits for one model:
both the user's overall limits (counted over all models) and the model's limits apply;
``priority`` and ``max_tokens_per_request`` of the model entry take precedence for that model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

DEFAULT_USER = "*"

#: the fields a per-model entry may set
MODEL_FIELDS = ("max_concurrent", "requests_per_minute", "tokens_per_day", "max_tokens_per_request", "priority")
#: limits on the user's notebook kernels as GPU tenants (user-wide only): GiB of GPU memory their
#: resident kernels may hold, and GiB they may pin (0: may not pin)
KERNEL_FIELDS = ("kernel_gpu_gib", "kernel_pin_gib")
#: every field of a quota row, in the order admins see them
FIELDS = ("allowed_models", *MODEL_FIELDS, *KERNEL_FIELDS)
INTEGER_FIELDS = frozenset({"max_concurrent", "requests_per_minute", "tokens_per_day", "max_tokens_per_request"})
DEFAULT_PRIORITY = 1.0
WINDOW_SECONDS = 60.0
MAX_INTEGER = 2**53  # what JSON clients (the sidebar) represent exactly
MAX_KERNEL_GIB = 1e6
MAX_PRIORITY = 1000.0


@dataclass(frozen=True)
class FieldInfo:
    """What a quota field means, for forms (the sidebar renders its inputs from these): a label,
    the unit of its value, one line of help, and what it is when no row sets it."""

    label: str
    unit: str
    help: str
    kind: str  # "integer", "number" or "models"
    unset: str  # what null means in the default row: the value that applies when nobody sets one
    minimum: float | None = None
    maximum: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "unit": self.unit, "help": self.help, "kind": self.kind, "unset": self.unset,
                "minimum": self.minimum, "maximum": self.maximum}


FIELD_INFO: dict[str, FieldInfo] = {
    "allowed_models": FieldInfo("Allowed models", "model names", "The models the user may call; empty: every model.",
                                "models", "every model"),
    "max_concurrent": FieldInfo("Concurrent requests", "requests at once",
                                "Requests queued or running at the same time, over all models.", "integer",
                                "no limit", 0, MAX_INTEGER),
    "requests_per_minute": FieldInfo("Requests per minute", "per minute",
                                     "Requests admitted in any 60 seconds (a sliding window).", "integer",
                                     "no limit", 0, MAX_INTEGER),
    "tokens_per_day": FieldInfo("Tokens per day", "tokens per UTC day",
                                "Prompt + completion tokens per day; the day starts at 00:00 UTC.", "integer",
                                "no limit", 0, MAX_INTEGER),
    "max_tokens_per_request": FieldInfo("Max tokens per request", "tokens",
                                        "The largest max_tokens a request may ask for; a request without one gets "
                                        "this.", "integer", "no limit", 0, MAX_INTEGER),
    "priority": FieldInfo("Priority", "weight", "Share of the queue against other users: 2 gets twice the turns "
                          "of 1.", "number", f"{DEFAULT_PRIORITY:g}", 0, MAX_PRIORITY),
    "kernel_gpu_gib": FieldInfo("Kernel GPU memory", "GiB", "GPU memory the user's notebook kernels may hold "
                                "together; idle ones beyond it are swapped out.", "number", "no limit", 0,
                                MAX_KERNEL_GIB),
    "kernel_pin_gib": FieldInfo("Kernel pinned memory", "GiB", "GPU memory the user may pin with %gpu pin "
                                "(0: may not pin).", "number", "no limit", 0, MAX_KERNEL_GIB),
}
#: the help of the per-model entries (``models``), which take the MODEL_FIELDS
MODELS_INFO = FieldInfo("Per model", "model: field=value, …",
                        "Extra limits on one model, on top of the ones above; e.g. gemma: tokens_per_day=1000.",
                        "overrides", "none")


class QuotaInputError(ValueError):
    """A quota row that cannot be stored; ``param`` names the field."""

    def __init__(self, param: str, message: str) -> None:
        self.param = param
        super().__init__(f"'{param}' {message}")


def _check_value(name: str, value: Any, param: str) -> Any:
    if value is None:
        return None
    if name == "allowed_models":
        if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
            raise QuotaInputError(param, "must be a list of model names, or null for every model.")
        return sorted(set(value))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise QuotaInputError(param, "must be a number, or null for no limit.")
    if name in INTEGER_FIELDS:
        if value != int(value):
            raise QuotaInputError(param, "must be a whole number.")
        value = int(value)
        if not 0 <= value <= MAX_INTEGER:
            raise QuotaInputError(param, f"must be between 0 and {MAX_INTEGER}.")
        return value
    if name in KERNEL_FIELDS:
        if not 0 <= value <= MAX_KERNEL_GIB:
            raise QuotaInputError(param, "must be a number of GiB between 0 and 1000000, or null for no limit.")
        return float(value)
    if not 0 < value <= MAX_PRIORITY:  # priority: a weight
        raise QuotaInputError(param, "must be greater than 0 and at most 1000.")
    return float(value)


def validate_row(body: Any) -> dict[str, Any]:
    """A quota row as stored: known fields only, values checked; raises QuotaInputError."""
    if not isinstance(body, dict):
        raise QuotaInputError("(body)", "must be a JSON object of quota fields.")
    row: dict[str, Any] = {}
    for key, value in body.items():
        if key == "user":
            continue  # echoed back by clients that send the whole row
        if key == "models":
            row["models"] = _validate_models(value)
        elif key in FIELDS:
            row[key] = _check_value(key, value, key)
        else:
            raise QuotaInputError(key, f"is not a quota field (fields: {', '.join((*FIELDS, 'models'))}).")
    return row


def _validate_models(value: Any) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise QuotaInputError("models", "must be an object mapping model names to quota fields.")
    out: dict[str, dict[str, Any]] = {}
    for model, entry in value.items():
        if not isinstance(entry, dict):
            raise QuotaInputError(f"models.{model}", "must be an object of quota fields.")
        checked: dict[str, Any] = {}
        for key, v in entry.items():
            if key not in MODEL_FIELDS:
                raise QuotaInputError(f"models.{model}.{key}",
                                      f"is not a per-model quota field (fields: {', '.join(MODEL_FIELDS)}).")
            checked[key] = _check_value(key, v, f"models.{model}.{key}")
        out[model] = checked
    return out


def check_model_names(row: Mapping[str, Any], known: Iterable[str]) -> None:
    """Every model a validated row names (``allowed_models``, the keys of ``models``) must be one of
    ``known``: a limit on a model that does not exist would be saved and never apply."""
    names = sorted(set(known))
    listing = ", ".join(names) or "none"
    for model in row.get("allowed_models") or ():
        if model not in names:
            raise QuotaInputError("allowed_models", f"names '{model}', which is not a model of this service "
                                                    f"(models: {listing}).")
    for model in row.get("models") or {}:
        if model not in names:
            raise QuotaInputError(f"models.{model}", f"is not a model of this service (models: {listing}).")


def plural(n: float, one: str, many: str | None = None) -> str:
    """``1 request``, ``2 requests``."""
    return f"{n:g} {one if n == 1 else (many or one + 's')}"


@dataclass(frozen=True)
class Limits:
    """What applies to one user on one model; None = no limit."""

    allowed_models: tuple[str, ...] | None = None
    max_concurrent: int | None = None
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None
    max_tokens_per_request: int | None = None
    priority: float = DEFAULT_PRIORITY
    # the model's own entry (default row's and the user's, merged)
    model_max_concurrent: int | None = None
    model_requests_per_minute: int | None = None
    model_tokens_per_day: int | None = None
    kernel_gpu_gib: float | None = None
    kernel_pin_gib: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "allowed_models": list(self.allowed_models) if self.allowed_models is not None else None,
            "max_concurrent": self.max_concurrent, "requests_per_minute": self.requests_per_minute,
            "tokens_per_day": self.tokens_per_day, "max_tokens_per_request": self.max_tokens_per_request,
            "priority": self.priority, "kernel_gpu_gib": self.kernel_gpu_gib, "kernel_pin_gib": self.kernel_pin_gib,
        }


def _merge(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if key != "models" and value is not None:
                merged[key] = value
    return merged


def effective_limits(rows: Mapping[str, Mapping[str, Any]], user: str, model: str | None) -> Limits:
    """The limits of ``user`` (on ``model``, when given) from the stored rows."""
    default = rows.get(DEFAULT_USER) or {}
    own = rows.get(user) or {} if user != DEFAULT_USER else {}
    top = _merge(default, own)
    per_model: dict[str, Any] = {}
    if model is not None:
        per_model = _merge((default.get("models") or {}).get(model), (own.get("models") or {}).get(model))
    allowed = top.get("allowed_models")
    max_tokens = [v for v in (top.get("max_tokens_per_request"), per_model.get("max_tokens_per_request"))
                  if v is not None]
    return Limits(
        allowed_models=tuple(allowed) if allowed is not None else None,
        max_concurrent=top.get("max_concurrent"),
        requests_per_minute=top.get("requests_per_minute"),
        tokens_per_day=top.get("tokens_per_day"),
        max_tokens_per_request=min(max_tokens) if max_tokens else None,
        priority=float(per_model.get("priority", top.get("priority", DEFAULT_PRIORITY))),
        model_max_concurrent=per_model.get("max_concurrent"),
        model_requests_per_minute=per_model.get("requests_per_minute"),
        model_tokens_per_day=per_model.get("tokens_per_day"),
        kernel_gpu_gib=top.get("kernel_gpu_gib"),
        kernel_pin_gib=top.get("kernel_pin_gib"),
    )


@dataclass(frozen=True)
class UsageNow:
    """The user's current use, as the admission sees it."""

    concurrent: int = 0
    concurrent_model: int = 0
    #: admission times (epoch seconds) within the last minute, oldest first
    recent: tuple[float, ...] = ()
    recent_model: tuple[float, ...] = ()
    tokens_today: int = 0
    tokens_today_model: int = 0


def usage_of(model: str, leases: Mapping[str, int], admissions: Sequence[tuple[str, float]],
             tokens: Mapping[str, int], now: float) -> UsageNow:
    """The user's use as the admission sees it, from what every node recorded: ``leases`` their
    requests queued or running per model, ``admissions`` (model, time) oldest first, ``tokens``
    today's per model. Only admissions within the last minute count (and any later than ``now``:
    another service's, made while this admission waited for its turn)."""
    since = now - WINDOW_SECONDS
    recent = [(m, at) for m, at in admissions if at > since]
    return UsageNow(
        concurrent=sum(leases.values()),
        concurrent_model=leases.get(model, 0),
        recent=tuple(at for _, at in recent),
        recent_model=tuple(at for m, at in recent if m == model),
        tokens_today=sum(tokens.values()),
        tokens_today_model=tokens.get(model, 0),
    )


def counts_minutes(limits: Limits) -> bool:
    """Whether the decision needs the user's admissions of the last minute."""
    return limits.requests_per_minute is not None or limits.model_requests_per_minute is not None


def counts_tokens(limits: Limits) -> bool:
    """Whether the decision needs the user's tokens of today."""
    return limits.tokens_per_day is not None or limits.model_tokens_per_day is not None


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    param: str | None = None
    retry_after: float | None = None


def next_utc_midnight(now: float) -> float:
    day = datetime.fromtimestamp(now, timezone.utc).date() + timedelta(days=1)
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp()


def utc_day(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def window_reset(recent: tuple[float, ...], limit: int, now: float) -> float:
    """When the per-minute window has room again: the moment enough admissions age out."""
    if limit <= 0 or not recent:
        return now + WINDOW_SECONDS
    excess = len(recent) - limit  # the (excess)-th oldest must leave the window
    return recent[max(0, excess)] + WINDOW_SECONDS


def model_refusal(limits: Limits, model: str) -> Refusal | None:
    """Why the user may not call ``model`` at all (their allowed models), or None. The first check of
    :func:`decide`, and the whole check of anything that asks for a model without calling it (the
    prefetch hint)."""
    if limits.allowed_models is not None and model not in limits.allowed_models:
        allowed = ", ".join(limits.allowed_models) or "none"
        return Refusal(403, "model_not_allowed",
                       f"Your quota does not include the model '{model}' (allowed: {allowed}).", param="model")
    return None


def decide(limits: Limits, usage: UsageNow, model: str, max_tokens: int | None, now: float) -> Refusal | None:
    """None to admit; else why not (checked in this order: model, size, concurrency, rate, tokens)."""
    if (refusal := model_refusal(limits, model)) is not None:
        return refusal
    if limits.max_tokens_per_request is not None and max_tokens is not None \
            and max_tokens > limits.max_tokens_per_request:
        return Refusal(400, "max_tokens_exceeded",
                       f"max_tokens {max_tokens} exceeds your limit of {limits.max_tokens_per_request} "
                       f"tokens per request.", param="max_tokens")
    for limit, used, scope in ((limits.max_concurrent, usage.concurrent, "over all models"),
                               (limits.model_max_concurrent, usage.concurrent_model, f"for '{model}'")):
        if limit is not None and used >= limit:
            return Refusal(429, "rate_limit_exceeded",
                           f"Concurrent request limit reached: {used} of {plural(limit, 'request')} {scope} "
                           f"{'is' if used == 1 else 'are'} queued or running; it frees as soon as "
                           f"{'it finishes' if used == 1 else 'one of them finishes'}.", retry_after=1.0)
    for limit, recent, scope in ((limits.requests_per_minute, usage.recent, ""),
                                 (limits.model_requests_per_minute, usage.recent_model, f" for '{model}'")):
        if limit is not None and len(recent) >= limit:
            reset = window_reset(recent, limit, now)
            return Refusal(429, "rate_limit_exceeded",
                           f"Rate limit reached: {plural(limit, 'request')} per minute{scope}; it resets at "
                           f"{iso(reset)}.",
                           retry_after=max(1.0, reset - now))
    for limit, used, scope in ((limits.tokens_per_day, usage.tokens_today, ""),
                               (limits.model_tokens_per_day, usage.tokens_today_model, f" for '{model}'")):
        if limit is not None and used >= limit:
            reset = next_utc_midnight(now)
            return Refusal(429, "insufficient_quota",
                           f"Token quota used up: {used} of {plural(limit, 'token')} per day{scope}; "
                           f"it resets at {iso(reset)} (midnight UTC).", retry_after=max(1.0, reset - now))
    return None
