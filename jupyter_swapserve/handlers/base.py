"""Shared handler behaviour: jupyter_server authentication, OpenAI-shaped errors everywhere."""

from __future__ import annotations

import hmac
import json
from asyncio import Future
from http import HTTPStatus
from typing import Any

from jupyter_server.auth.identity import IdentityProvider, PasswordIdentityProvider
from jupyter_server.base.handlers import APIHandler
from tornado import web

from ..service import SwapService
from ..service.identity import ANONYMOUS, AdminRule, Identity

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


INVALID_CREDENTIALS = ("Missing or invalid credentials: pass the Jupyter token as the API key "
                       "(Authorization: Bearer <token>).")


def presented_token(authorization: str, query_token: str) -> str | None:
    """The token a request presents, "" for credentials that cannot be a token (an ``Authorization``
    header of another scheme), None when it presents none (it may still carry a login cookie)."""
    if authorization.strip():
        scheme, _, value = authorization.strip().partition(" ")
        return value.strip() if scheme.lower() in ("token", "bearer") else ""
    return query_token or None


class OpenAIError(web.HTTPError):
    """An error that reaches the client as ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(status, reason=HTTPStatus(status).phrase)
        self.message, self.param, self.code, self.retry_after = message, param, code, retry_after


class SwapServeHandler(APIHandler):
    auth_resource = "swapserve"

    @property
    def service(self) -> SwapService:
        return self.settings["swapserve_service"]

    @property
    def user_name(self) -> str | None:
        user = self.current_user
        return getattr(user, "username", None) or (user if isinstance(user, str) else None)

    def identity(self) -> Identity:
        """The caller: JupyterHub's user model where a hub vouches for them (``hub_user``), else
        the jupyter_server user of a standalone server (one user, admin)."""
        rule: AdminRule = self.settings.get("swapserve_admin_rule") or AdminRule()
        hub_user = getattr(self.current_user, "hub_user", None)
        if isinstance(hub_user, dict):
            return rule.identify(hub_user.get("name") or self.user_name, hub_user.get("groups") or (),
                                 hub_admin=bool(hub_user.get("admin")), scopes=hub_user.get("scopes") or ())
        if type(self.identity_provider) in (IdentityProvider, PasswordIdentityProvider):
            # token and password logins make a new anonymous user per browser or client: they are
            # all the server's one user, and their quota and usage must be one too
            return rule.identify(self.settings.get("swapserve_local_user") or ANONYMOUS)
        return rule.identify(self.user_name)

    def require_admin(self) -> Identity:
        identity = self.identity()
        if not identity.admin:
            raise OpenAIError(403, f"User '{identity.name}' is not an admin of this swap service.", code="forbidden")
        return identity

    async def prepare(self) -> None:  # type: ignore[override]
        # judged before jupyter_server resolves the user: every identity provider (jupyter_server's,
        # JupyterHub's) falls back to the login cookie when a presented token is wrong, and checks
        # XSRF on that cookie, which would turn the refusal into a 403 about a missing cookie
        if await self._presents_a_wrong_token():
            raise OpenAIError(401, INVALID_CREDENTIALS, code="invalid_api_key")
        await super().prepare()

    async def _presents_a_wrong_token(self) -> bool:
        """Whether the request presents a token (an ``Authorization`` header, ``?token=``) that does
        not authenticate it. A request that presents credentials is judged by them alone."""
        presented = presented_token(self.request.headers.get("Authorization", ""),
                                    self.get_query_argument("token", ""))
        if presented is None:
            return False
        provider = self.identity_provider
        hub_auth = getattr(provider, "hub_auth", None)
        if hub_auth is not None:  # JupyterHub's identity provider: users' servers, the shared service
            from ..hub import token_is_valid  # only under a hub: it imports JupyterHub's service auth

            return not await token_is_valid(hub_auth, presented, self)
        if type(provider) in (IdentityProvider, PasswordIdentityProvider):
            if not provider.auth_enabled:
                return False  # a server without authentication (token and password off) takes anything
            token = getattr(provider, "token", "") or ""
            return not (presented and token and hmac.compare_digest(presented, token))
        return False  # another identity provider: its own token logic decides

    def check_xsrf_cookie(self) -> None:
        # without a user the request is refused with 401 by require_user(); checking XSRF first
        # would turn that into a 403 about a missing cookie, which misleads API clients
        if getattr(self, "_jupyter_current_user", None) is None:
            return
        super().check_xsrf_cookie()

    def require_user(self, action: str = "read") -> None:
        if not self.current_user:
            raise OpenAIError(401, INVALID_CREDENTIALS, code="invalid_api_key")
        if not self.authorizer.is_authorized(self, self.current_user, action, self.auth_resource):
            raise OpenAIError(403, f"User '{self.user_name}' may not {action} swapserve.", code="forbidden")

    def read_json(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"")
        except (UnicodeDecodeError, ValueError) as exc:
            raise OpenAIError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
        self._json_body = body  # its model labels this request's metrics
        return body

    # ---- metrics (handlers/metrics.py): every request by route, model and status; queue wait and
    # time to first token from what the OpenAI routes already report ---------------------------
    def _metrics_model(self) -> Any:
        return (getattr(self, "_json_body", None) or {}).get("model")

    def flush(self, include_footers: bool = False) -> Future[None]:
        metrics = self.settings.get("swapserve_metrics")
        if (metrics is not None and not getattr(self, "_first_flush_seen", False)
                and str(self._headers.get("Content-Type", "")).startswith("text/event-stream")
                and self._metrics_model() is not None):
            self._first_flush_seen = True
            metrics.first_token(self._metrics_model(), self.request.request_time())
        return super().flush(include_footers)

    def on_finish(self) -> None:
        super().on_finish()
        metrics = self.settings.get("swapserve_metrics")
        if metrics is None:
            return
        model = self._metrics_model()
        metrics.request(getattr(self, "upstream_path", None) or type(self).__name__, model, self.get_status())
        queued = self._headers.get("x-swapserve-queue-seconds")
        swapped = self._headers.get("x-swapserve-swap-in-seconds")
        if queued is not None and swapped is not None:
            metrics.admitted(model, float(queued), float(swapped))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, OpenAIError):
            message, param, code = exc.message, exc.param, exc.code
            if exc.retry_after is not None:
                self.set_header("Retry-After", str(max(1, round(exc.retry_after))))
        elif isinstance(exc, web.HTTPError) and exc.log_message:
            message, param, code = exc.log_message % exc.args if exc.args else exc.log_message, None, None
        elif status_code >= 500:
            # the traceback goes to the server log, never to the client
            message, param, code = "Internal error in jupyter-swapserve; see the server log.", None, "internal_error"
        else:
            message, param, code = self._reason, None, None
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": {
            "message": message, "type": ERROR_TYPES.get(status_code, "api_error"), "param": param, "code": code,
        }}))
