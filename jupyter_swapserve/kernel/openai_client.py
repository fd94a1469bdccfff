"""The ``openai`` client on the swap route, for any kernel: the server is found the way ``%%llm``
finds it (``SWAPSERVE_URL``/``SWAPSERVE_TOKEN``, the Jupyter runtime directory, the JupyterHub
environment), so a notebook runs the same in a kernel the server started, under ``jupyter
nbconvert --execute``, or in a kernel of another server::

    import jupyter_swapserve
    client = jupyter_swapserve.openai_client()          # openai.OpenAI
    aclient = jupyter_swapserve.async_openai_client()   # openai.AsyncOpenAI
"""

from __future__ import annotations

from typing import Any

from .client import Connection, LLMError, discover, normalize_base_url


def connection(url: str | None = None, token: str | None = None) -> Connection:
    """The swap service this kernel reaches (``base_url``, ``token``, ``api_url``): found as ``%%llm``
    finds it, or the given ``url`` (the server's, or its ``/swapserve/v1`` route) and ``token``.
    Raises LLMError naming every place it looked."""
    configured = Connection(normalize_base_url(url), token or "", "the url argument") if url else None
    return discover(configured)


def _openai() -> Any:
    try:
        import openai
    except ImportError:
        raise LLMError("the openai package is not installed in this kernel: pip install openai") from None
    return openai


def _arguments(url: str | None, token: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    conn = connection(url, token)
    # the client insists on a key; a server without a token ignores it
    return {"base_url": conn.api_url, "api_key": conn.token or "no-token", **kwargs}


def openai_client(url: str | None = None, token: str | None = None, **kwargs: Any) -> Any:
    """An ``openai.OpenAI`` client of the swap route (``kwargs`` go to it: ``max_retries``, ``timeout``...)."""
    return _openai().OpenAI(**_arguments(url, token, kwargs))


def async_openai_client(url: str | None = None, token: str | None = None, **kwargs: Any) -> Any:
    """An ``openai.AsyncOpenAI`` client of the swap route (for ``await`` and ``asyncio.gather``)."""
    return _openai().AsyncOpenAI(**_arguments(url, token, kwargs))
