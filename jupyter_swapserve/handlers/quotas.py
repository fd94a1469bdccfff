"""Quotas and usage: GET /swapserve/api/quotas, PUT|DELETE /swapserve/api/quotas/<user> (admins),
GET /swapserve/api/usage (admins: everyone; users: themselves)."""

from __future__ import annotations

from urllib.parse import unquote

from ..service.accounting import QuotaAccounting
from ..service.quotas import DEFAULT_USER, FIELDS, QuotaInputError
from ..service.storage import StorageError
from .base import OpenAIError, SwapServeHandler

MAX_USER_NAME = 255
MAX_DAYS = 366


class QuotaHandlerBase(SwapServeHandler):
    @property
    def accounting(self) -> QuotaAccounting:
        accounting = self.service.accounting
        if accounting is None:
            raise OpenAIError(404, "Quotas are off on this server (no quota database).", code="quotas_disabled")
        return accounting

    def user_param(self, raw: str) -> str:
        user = unquote(raw)
        if not user or len(user) > MAX_USER_NAME or any(ord(c) < 32 for c in user):
            raise OpenAIError(400, f"'{user[:40]}' is not a user name.", param="user", code="invalid_value")
        return user


class QuotasHandler(QuotaHandlerBase):
    async def get(self) -> None:
        self.require_user("read")
        self.require_admin()
        self.finish({"admin": True, "fields": [*FIELDS, "models"], "default_user": DEFAULT_USER,
                     "quotas": self.accounting.listing()})


class UserQuotaHandler(QuotaHandlerBase):
    async def get(self, raw_user: str) -> None:
        self.require_user("read")
        identity = self.identity()
        user = self.user_param(raw_user)
        if user != identity.name and not identity.admin:
            raise OpenAIError(403, "Only admins can read other users' quotas.", code="forbidden")
        self.finish({**self.accounting.row(user), "effective": self.accounting.limits(user).as_dict()})

    async def put(self, raw_user: str) -> None:
        self.require_user("write")
        self.require_admin()
        user = self.user_param(raw_user)
        body = self.read_json()
        try:
            row = self.accounting.put(user, body)
        except QuotaInputError as exc:
            raise OpenAIError(400, str(exc), param=exc.param, code="invalid_value") from None
        except StorageError as exc:
            raise OpenAIError(503, f"The quota database refused the change: {exc}", code="storage_error") from None
        self.service.notifier.notify()
        self.finish(row)

    async def delete(self, raw_user: str) -> None:
        self.require_user("write")
        self.require_admin()
        user = self.user_param(raw_user)
        deleted = self.accounting.delete(user)
        self.service.notifier.notify()
        self.finish({"user": user, "deleted": deleted})


class UsageHandler(QuotaHandlerBase):
    async def get(self) -> None:
        self.require_user("read")
        identity = self.identity()
        asked = self.get_argument("user", None)
        if asked is not None and asked != identity.name and not identity.admin:
            raise OpenAIError(403, "Only admins can read other users' usage.", param="user", code="forbidden")
        raw_days = self.get_argument("days", "1")
        try:
            days = int(raw_days)
        except ValueError:
            days = 0
        if not 1 <= days <= MAX_DAYS:
            raise OpenAIError(400, f"'days' must be a whole number from 1 to {MAX_DAYS}.", param="days",
                              code="invalid_value")
        user = asked or identity.name
        everyone = identity.admin and asked is None
        self.finish(self.accounting.report(user, identity.admin, everyone=everyone, days=days))
