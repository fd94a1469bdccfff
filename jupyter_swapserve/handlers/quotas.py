"""Quotas and usage: GET /swapserve/api/quotas, PUT|DELETE /swapserve/api/quotas/<user> (admins),
GET /swapserve/api/usage (admins: everyone; users: themselves)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from ..service.accounting import QuotaAccounting
from ..service.quotas import (
    DEFAULT_USER,
    FIELD_INFO,
    FIELDS,
    MODELS_INFO,
    QuotaInputError,
    check_model_names,
    validate_row,
)
from ..service.storage import StorageError
from .base import OpenAIError, SwapServeHandler

MAX_USER_NAME = 255
MAX_DAYS = 366
#: the most user names the users route lists (pages of the hub's API, HUB_PAGE at a time)
MAX_LISTED_USERS = 5000
HUB_PAGE = 200
HUB_PAGINATION = "application/jupyterhub-pagination+json"


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
                     "quotas": self.accounting.listing(),
                     # what the form needs to explain itself: each field's label, unit, help and what
                     # applies when it is left empty; the models a row may name; when a day starts
                     "field_info": {**{f: FIELD_INFO[f].as_dict() for f in FIELDS}, "models": MODELS_INFO.as_dict()},
                     "models": list(self.service.backends), "day_starts": "00:00 UTC"})


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
            check_model_names(validate_row(body), self.service.backends)
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


class UsersHandler(SwapServeHandler):
    """GET /swapserve/api/users (admins): the names of the users a quota can be given to, for the
    sidebar's quota form to offer. On a hub service, the hub's users, asked with the service's own
    hub token (the service's role needs ``list:users`` and ``read:users:name``); the token is sent
    to the hub only, and the answer holds names only. A standalone server has its one user."""

    async def get(self) -> None:
        self.require_user("read")
        self.require_admin()
        hub_auth = getattr(self.identity_provider, "hub_auth", None)
        if self.settings.get("swapserve_mode") != "service" or not getattr(hub_auth, "api_token", ""):
            self.finish({"users": [self.identity().name], "source": "server"})
            return
        assert hub_auth is not None
        self.finish({"users": await self._hub_users(hub_auth.api_url, hub_auth.api_token), "source": "hub"})

    async def _hub_users(self, api_url: str, token: str) -> list[str]:
        names: list[str] = []
        offset: int | None = 0
        client = AsyncHTTPClient()
        while offset is not None and len(names) < MAX_LISTED_USERS:
            url = f"{api_url.rstrip('/')}/users?offset={offset}&limit={HUB_PAGE}"
            try:
                response = await client.fetch(url, headers={"Authorization": f"token {token}",
                                                            "Accept": HUB_PAGINATION}, request_timeout=15)
                page: Any = json.loads(response.body)
            except HTTPClientError as exc:
                hint = (" (the service's hub role needs the scopes list:users and read:users:name)"
                        if exc.code == 403 else "")
                raise OpenAIError(503, f"The hub refused to list its users: HTTP {exc.code}{hint}.",
                                  code="hub_unavailable") from None
            except (OSError, ValueError) as exc:
                raise OpenAIError(503, f"The hub did not answer the list of its users ({exc.__class__.__name__}).",
                                  code="hub_unavailable") from None
            items = page.get("items", []) if isinstance(page, dict) else page  # a hub without pagination
            names += [u["name"] for u in items if isinstance(u, dict) and isinstance(u.get("name"), str)]
            following = (page.get("_pagination") or {}).get("next") if isinstance(page, dict) else None
            offset = following.get("offset") if isinstance(following, dict) else None
        return sorted(set(names))[:MAX_LISTED_USERS]
