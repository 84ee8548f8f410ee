"""A client for any OpenAI-compatible chat-completions server (vLLM, llama.cpp, Ollama, a hosted API), so a
model larger than the policy can critique, revise and judge. Requests run a few at a time, wait at most
``timeout`` seconds, and are retried with exponential backoff on 429, 5xx and timeouts; a response that
cannot be read is a named failure on that reply (``Reply.failure``), never a crash. The API key is read from
the environment variable the config names and lives only in the request header.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from alignkit.config import ConfigError

# Failure names, as counted in the stages' summaries.
FAILURES = ("malformed_json", "malformed_response", "timeout", "rate_limited", "server_error", "http_error")


@dataclass(frozen=True)
class EndpointSettings:
    base_url: str  # e.g. http://127.0.0.1:8000/v1 (the client posts to <base_url>/chat/completions)
    model: str  # the model's name on that server
    api_key_env: str | None = None  # environment variable holding the key; None: no Authorization header
    timeout: float = 60.0  # seconds per request
    max_retries: int = 4  # retries on 429, 5xx and timeouts
    max_concurrency: int = 4  # requests in flight at once
    backoff: float = 0.5  # the first retry waits this long; each further one twice as long

    @classmethod
    def of(cls, cfg, base_url: str, model: str) -> EndpointSettings:
        """``base_url`` serving ``model``, with the request settings of ``cfg`` (an ``EndpointFields``)."""
        timeout, retries, concurrency = cfg.request_timeout, cfg.max_retries, cfg.max_concurrency
        return cls(base_url, model, cfg.api_key_env, timeout, retries, concurrency)


@dataclass(frozen=True)
class EndpointReply:
    text: str
    finished: bool  # finish_reason "stop" (not "length": the token cap)
    failure: str | None = None  # one of FAILURES, then text is ""
    top_logprobs: dict[str, float] | None = None  # the first token's alternatives, when asked and returned


class ChatEndpoint:
    def __init__(self, settings: EndpointSettings):
        import httpx  # a dependency of alignkit, imported only when an endpoint is used

        self.settings = settings
        headers = {"Content-Type": "application/json"}
        if settings.api_key_env is not None:
            key = os.environ.get(settings.api_key_env)
            if not key:
                raise ConfigError(f"api_key_env: the environment variable {settings.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        self._httpx = httpx
        self.client = httpx.Client(
            base_url=settings.base_url.rstrip("/"), headers=headers, timeout=settings.timeout
        )

    def chat(self, messages: list[dict], **params) -> EndpointReply:
        """One chat completion; ``params`` go into the request body (max_tokens, temperature, logprobs...)."""
        body = {"model": self.settings.model, "messages": messages, **params}
        failure = "http_error"
        for attempt in range(self.settings.max_retries + 1):
            if attempt:
                time.sleep(self.settings.backoff * 2 ** (attempt - 1))
            try:
                response = self.client.post("/chat/completions", json=body)
            except self._httpx.TimeoutException:
                failure = "timeout"
                continue
            except self._httpx.TransportError:
                failure = "http_error"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                failure = "rate_limited" if response.status_code == 429 else "server_error"
                continue
            if response.status_code != 200:
                return EndpointReply("", False, "http_error")  # a 4xx other than 429 will not get better
            return parse_reply(response.text)
        return EndpointReply("", False, failure)

    def chat_many(self, conversations: list[list[dict]], **params) -> list[EndpointReply]:
        """One completion per conversation, at most max_concurrency at once, in the input order."""
        with ThreadPoolExecutor(self.settings.max_concurrency) as pool:
            return list(pool.map(lambda m: self.chat(m, **params), conversations))


def parse_reply(body: str) -> EndpointReply:
    """The first choice of a chat-completions response body; a named failure when it is not one."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return EndpointReply("", False, "malformed_json")
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise TypeError("content is not a string")
    except (KeyError, IndexError, TypeError):
        return EndpointReply("", False, "malformed_response")
    top = None
    content = (choice.get("logprobs") or {}).get("content") or []
    if content and isinstance(content[0], dict):
        first = content[0]
        top = {t["token"]: float(t["logprob"]) for t in first.get("top_logprobs") or [] if "token" in t}
        top.setdefault(first.get("token", ""), float(first.get("logprob", float("-inf"))))
    return EndpointReply(text, choice.get("finish_reason") == "stop", None, top)
