"""The critic and the judge behind an OpenAI-compatible endpoint: a real HTTP server on loopback (Starlette +
uvicorn in a thread) answering from canned text, with scripted failures (429, a timeout, malformed JSON), and
cai-revise / cai-label run through it; a server serving the tiny test model's own generations to cai-revise;
plus the endpoint judge's answer reading and clipping on hand-worked values."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from _serving import serving  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from alignkit import cli  # noqa: E402
from alignkit.cai.endpoint_judge import (  # noqa: E402
    clip_chars,
    p_first_from_logprobs,
    parse_letter,
    read_answer,
)
from alignkit.models.endpoint import ChatEndpoint, EndpointReply, EndpointSettings, parse_reply  # noqa: E402

KEY = "sk-test-7f3a9c1e-never-on-disk"
CRITIQUE = "The reply is too short and could be clearer."
REVISION = "The capital of France is Paris, a safe and friendly answer."
_REPLIES = re.compile(r"Reply \(A\):\n(.*?)\n\nReply \(B\):\n(.*?)\n\n", re.S)


class FakeOpenAI:
    """A chat-completions server: ``script`` holds the next requests' actions ("ok", "429", "500", "sleep",
    "malformed", "no_choices", "gibberish"), then every request is "ok". As a critic it answers CRITIQUE to a
critique request (the conversation's second user turn) and REVISION to a revision request; as a
    judge (a question with "Reply (A)") it prefers the longer reply, with top log-probs 0.9/0.1 when asked
    for log-probs and ``logprobs`` is on, else with the letter alone."""

    def __init__(self, logprobs: bool = True):
        self.script: list[str] = []
        self.logprobs = logprobs
        self.requests: list[dict] = []
        self.auth: list[str | None] = []

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.auth.append(request.headers.get("authorization"))
        action = self.script.pop(0) if self.script else "ok"
        if action in ("429", "500"):
            return JSONResponse({"error": "busy"}, status_code=int(action))
        if action == "sleep":
            await asyncio.sleep(1.0)
        if action == "malformed":
            return Response("{not json", media_type="application/json")
        if action == "no_choices":
            return JSONResponse({"id": "x", "choices": []})
        question = body["messages"][-1]["content"]
        replies = _REPLIES.search(question)
        if replies is None:
            n_user_turns = sum(m["role"] == "user" for m in body["messages"])
            return JSONResponse(_completion(CRITIQUE if n_user_turns == 2 else REVISION))
        first_longer = len(replies.group(1)) >= len(replies.group(2))
        letter = "A" if first_longer else "B"
        text = "I cannot say." if action == "gibberish" else letter
        if not (self.logprobs and body.get("logprobs")) or action == "gibberish":
            return JSONResponse(_completion(text))
        top = [
            {"token": letter, "logprob": math.log(0.9)},
            {"token": "B" if letter == "A" else "A", "logprob": math.log(0.1)},
        ]
        first = {"token": letter, "logprob": top[0]["logprob"], "top_logprobs": top}
        return JSONResponse(_completion(text, {"content": [first]}))


def _completion(text: str, logprobs: dict | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {"id": "chatcmpl-test", "object": "chat.completion", "choices": [choice]}


@contextlib.contextmanager
def _serving(handler):
    """``handler`` as POST /v1/chat/completions on a free loopback port, in a thread; yields the base URL."""
    with serving(Starlette(routes=[Route("/v1/chat/completions", handler, methods=["POST"])])) as url:
        yield url + "/v1"


@pytest.fixture
def server():
    """The fake server on a free loopback port, in a thread; yields (FakeOpenAI, base_url)."""
    fake = FakeOpenAI()
    with _serving(fake.chat) as url:
        yield fake, url


@pytest.fixture
def stages(monkeypatch):
    monkeypatch.setitem(cli.STAGES, "cai-revise", ("alignkit.stages.cai_revise", "critique -> revision"))
    monkeypatch.setitem(cli.STAGES, "cai-label", ("alignkit.stages.cai_label", "RLAIF labels"))


# ---------------------------------------------------------------------------------------------
# Reading replies (pure)
# ---------------------------------------------------------------------------------------------


def test_p_first_from_logprobs_hand_worked():
    """p(A)=0.6, p(B)=0.2 -> P(A among A, B) = 0.6/0.8 = 0.75, mass 0.8; " (A" counts as A. B missing from
    [A 0.5, C 0.1]: it gets the floor 0.1 -> 0.5/0.6, mass 0.5. Neither letter: None."""
    p, mass = p_first_from_logprobs({" (A": math.log(0.6), "B": math.log(0.2), "C": math.log(0.1)})
    assert p == pytest.approx(0.75) and mass == pytest.approx(0.8)
    p, mass = p_first_from_logprobs({"A": math.log(0.5), "C": math.log(0.1)})
    assert p == pytest.approx(0.5 / 0.6) and mass == pytest.approx(0.5)
    assert p_first_from_logprobs({"Sure": -0.1}) is None


def test_parse_letter_and_read_answer():
    assert parse_letter("B") == "B" and parse_letter("(A) is better") == "A"
    assert parse_letter("Answer: b") == "B" and parse_letter("I prefer reply (B).") == "B"
    assert parse_letter("(A) or (B)") is None and parse_letter("Both are fine") is None
    assert parse_letter("Absolutely") is None  # a word starting with A is not the letter
    assert read_answer(EndpointReply("I cannot say", True)) == (0.5, 0.0, "unparseable")
    assert read_answer(EndpointReply("", False, "timeout")) == (0.5, 0.0, "timeout")
    assert read_answer(EndpointReply("A", True)) == (1.0, 1.0, None)


def test_parse_reply_names_malformed_responses():
    assert parse_reply("{oops").failure == "malformed_json"
    assert parse_reply('{"choices": []}').failure == "malformed_response"
    assert parse_reply('{"choices": [{"message": {"content": null}}]}').failure == "malformed_response"
    ok = parse_reply(json.dumps(_completion("hi")))
    assert (ok.text, ok.finished, ok.failure) == ("hi", True, None)


# ---------------------------------------------------------------------------------------------
# The client against the server
# ---------------------------------------------------------------------------------------------


def _client(base_url, **kw) -> ChatEndpoint:
    return ChatEndpoint(EndpointSettings(base_url, "canned", backoff=0.05, **kw))


def test_client_retries_429_and_5xx_then_succeeds(server):
    fake, url = server
    fake.script = ["429", "500", "ok"]
    reply = _client(url, max_retries=2).chat([{"role": "user", "content": "hi"}])
    assert reply.text == REVISION and reply.failure is None  # one user turn: not a critique request and len(fake.requests) == 3
    fake.script = ["429", "429"]
    assert _client(url, max_retries=1).chat([{"role": "user", "content": "hi"}]).failure == "rate_limited"


def test_client_timeout_and_malformed_json_are_named_failures(server):
    fake, url = server
    fake.script = ["sleep"]
    assert _client(url, timeout=0.2, max_retries=0).chat([{"role": "user", "content": "x"}]).failure == "timeout"
    fake.script = ["malformed"]
    n = len(fake.requests)
    reply = _client(url, max_retries=3).chat([{"role": "user", "content": "x"}])
    assert reply.failure == "malformed_json" and len(fake.requests) == n + 1  # not retried


def test_client_sends_the_key_from_the_environment_and_refuses_a_missing_one(server, monkeypatch):
    fake, url = server
    monkeypatch.setenv("ALIGNKIT_TEST_KEY", KEY)
    _client(url, api_key_env="ALIGNKIT_TEST_KEY").chat([{"role": "user", "content": "x"}])
    assert fake.auth[-1] == f"Bearer {KEY}"
    monkeypatch.delenv("ALIGNKIT_TEST_KEY")
    with pytest.raises(Exception, match="ALIGNKIT_TEST_KEY is not set"):
        _client(url, api_key_env="ALIGNKIT_TEST_KEY")


# ---------------------------------------------------------------------------------------------
# cai-revise and cai-label through the server
# ---------------------------------------------------------------------------------------------


def _files_text(folder) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())


def test_cai_revise_with_an_endpoint_critic(stages, server, tiny_model_dir, tmp_path, monkeypatch):
    """The tiny model answers; the server critiques and revises (REVISION). Its first request gets a 429 (retried),
    and the revision request of the second prompt a malformed body: that prompt's revision is gated
    'endpoint_malformed_json' and counted. The key never reaches the run folder."""
    fake, url = server
    monkeypatch.setenv("ALIGNKIT_TEST_KEY", KEY)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "what is the capital of france?"}\n{"prompt": "tell me about paris"}\n')
    run_dir = tmp_path / "run"
    out = run_dir / "revised.jsonl"
    # one prompt per batch, concurrency 1: requests are critique 1, revision 1, critique 2, revision 2
    fake.script = ["429", "ok", "ok", "ok", "malformed"]
    args = [
        "cai-revise",
        f"prompts={prompts}",
        f"output={out}",
        f"model={tiny_model_dir}",
        "critic_model=canned",
        f"critic_base_url={url}",
        "api_key_env=ALIGNKIT_TEST_KEY",
        "max_concurrency=1",
        "prompts_per_batch=1",
        "max_new_tokens=6",
        "gates=[echo,empty,unchanged,off_topic,loops]",  # the tiny policy's answers are always truncated
        "progress=false",
    ]
    assert cli.main(args) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert rows[0]["target"] == "revision" and rows[0]["completion"] == REVISION
    assert rows[0]["critic_model"] == "canned" and rows[0]["revisions"][0]["critique"] == CRITIQUE
    assert summary["gates"]["endpoint_malformed_json"]["count"] == 1
    assert summary["targets"] == {"revision": 1, "initial": 1, "none": 0}
    assert all(a == f"Bearer {KEY}" for a in fake.auth)
    assert KEY not in _files_text(run_dir)


def test_cai_label_with_an_endpoint_judge(stages, server, tmp_path, monkeypatch):
    """The server's judge prefers the longer reply (0.9 in each order), so every pair's chosen response is
    its longer one with p_chosen 0.9. A malformed reply and an unparseable one make two pairs fail: they are
    counted, not written, and the next run asks them again."""
    fake, url = server
    monkeypatch.setenv("ALIGNKIT_TEST_KEY", KEY)
    pairs = [
        {"prompt": "capital of france?", "response_a": "paris.", "response_b": "it is paris, the capital."},
        {"prompt": "a poem", "response_a": "the sea and the sky and the sand.", "response_b": "no."},
        {"prompt": "help me", "response_a": "here is a helpful answer.", "response_b": "sorry."},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    run_dir = tmp_path / "run"
    out = run_dir / "labelled.jsonl"
    args = [
        "cai-label",
        f"input={data}",
        f"output={out}",
        "judge_model=canned",
        f"judge_base_url={url}",
        "api_key_env=ALIGNKIT_TEST_KEY",
        "max_concurrency=1",
        "principles_per_comparison=1",
        "progress=false",
    ]
    # 2 requests per pair (both orders): pair 0 ok, pair 1's first order malformed, pair 2's first unparseable
    fake.script = ["ok", "ok", "malformed", "ok", "gibberish", "ok"]
    assert cli.main(args) == 0
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["pairs_failed_this_run"] == 2
    assert summary["judge_failures_this_run"] == {"malformed_json": 1, "unparseable": 1}
    assert summary["pairs_judged"] == 1 and summary["pairs_written"] == 1

    assert cli.main(args) == 0  # the rerun asks only the two failed pairs
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["pairs_this_run"] == 2 and summary["pairs_failed_this_run"] == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["prompt_row"] for r in rows) == [0, 1, 2]
    for r in rows:
        assert len(r["chosen"]) > len(r["rejected"]) and r["p_chosen"] == pytest.approx(0.9)
    assert len(fake.requests) == 6 + 4
    assert KEY not in _files_text(run_dir)

    # a server without log-probs: the letter alone decides (p 1.0)
    fake.logprobs = False
    assert cli.main([*args, f"output={run_dir / 'letters.jsonl'}"]) == 0
    rows = [json.loads(x) for x in (run_dir / "letters.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["p_chosen"] == 1.0 for r in rows)


# ---------------------------------------------------------------------------------------------
# cai-label: the served model's name, clipping, the URL in the summary
# ---------------------------------------------------------------------------------------------


def test_cai_label_endpoint_needs_the_served_models_name(stages, tmp_path, capsys):
    """judge_base_url with judge_model left at the local default is refused before any request is sent."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "response_a": "a", "response_b": "b"}) + "\n")
    argv = ["cai-label", f"input={data}", f"output={tmp_path / 'out.jsonl'}", "judge_base_url=http://127.0.0.1:9/v1"]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "judge_base_url needs judge_model" in err and "smollm2-135m-instruct" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_clip_chars_hand_values():
    """4 characters a token: 2 tokens keep 8 characters of the start, or of the end, marked with "..."."""
    assert clip_chars("abcdefghijkl", 2) == "abcdefgh ..."
    assert clip_chars("abcdefghijkl", 2, keep="end") == "... efghijkl"
    assert clip_chars("abcdefgh", 2) == "abcdefgh" and clip_chars("x" * 99, None) == "x" * 99


def test_cai_label_endpoint_clips_like_the_local_judge(stages, server, tmp_path):
    """max_context_tokens=4 / max_response_tokens=3 reach the server as 16 / 12 characters: the conversation's
    end and the responses' starts. The summary names the server's URL."""
    fake, url = server
    long_b = "the longer reply, which goes on and on well past twelve characters"
    pair = {"prompt": "an opening question that is long, then the end", "response_a": "short one.", "response_b": long_b}
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(pair) + "\n")
    out = tmp_path / "labelled.jsonl"
    argv = [
        "cai-label", f"input={data}", f"output={out}", "judge_model=canned", f"judge_base_url={url}",
        "principles_per_comparison=1", "max_context_tokens=4", "max_response_tokens=3", "progress=false",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    # Both orders are asked at once (chat_many's threads), so the server sees them in either order.
    asked = [r["messages"][0]["content"] for r in fake.requests]
    assert len(asked) == 2
    a_first = next(q for q in asked if "Reply (A):\nshort one.\n\n" in q)  # 10 characters: not clipped
    b_first = next(q for q in asked if q is not a_first)
    for q in asked:
        assert "Conversation:\n... ng, then the end\n\n" in q  # "User: " + the prompt: its last 16 characters
    assert "Reply (B):\nthe longer r ...\n\n" in a_first  # its first 12 characters
    assert "Reply (A):\nthe longer r ...\n\n" in b_first and "Reply (B):\nshort one.\n\n" in b_first
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["judge_base_url"] == url and summary["judge"] == "canned"


# ---------------------------------------------------------------------------------------------
# A server that serves the tiny model's own generations
# ---------------------------------------------------------------------------------------------


class TinyModelServer:
    """Chat completions from the tiny test model, greedy whatever the request asks (so a test can recompute
    them), with a repetition penalty: the random tiny model's plain greedy text repeats the template's last
    token ("\\n\\n\\n..."). The model is loaded on the first request, in the server's thread. Every
    (messages, reply) is kept."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.model = self.tokenizer = None
        self.served: list[tuple[list[dict], dict]] = []

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        if self.model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype="float32").eval()
        text, finished = greedy_reply(self.model, self.tokenizer, body["messages"], body["max_tokens"])
        reply = _completion(text)
        reply["choices"][0]["finish_reason"] = "stop" if finished else "length"
        self.served.append((body["messages"], reply))
        return JSONResponse(reply)


def greedy_reply(model, tokenizer, messages: list[dict], max_tokens: int) -> tuple[str, bool]:
    """The model's greedy continuation of ``messages`` (chat template; repetition penalty 5, as vLLM's
    ``repetition_penalty``), and whether it ended with EOS."""
    import torch

    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = enc["input_ids"]  # (1, T)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, repetition_penalty=5.0,
        )  # fmt: skip
    new = out[0, ids.shape[1] :].tolist()
    finished = tokenizer.eos_token_id in new
    return tokenizer.decode(new, skip_special_tokens=True), finished


def test_cai_revise_against_a_served_model(stages, tiny_model_dir, tmp_path):
    """The critic is the tiny model behind the HTTP server: each critique and revision written is the served
    model's greedy text (recomputed here from the conversation the client sent), the critique is fed back in
    the revision request, and the revision, passing the one gate enabled (echo), is the SFT target."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    served = TinyModelServer(tiny_model_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "what is the capital of france?"}\n')
    out = tmp_path / "revised.jsonl"
    with _serving(served.chat) as url:
        argv = [
            "cai-revise", f"prompts={prompts}", f"output={out}", f"model={tiny_model_dir}", "critic_model=tiny",
            f"critic_base_url={url}", "max_concurrency=1", "max_new_tokens=5", "gates=[echo]", "progress=false",
        ]  # fmt: skip
        assert cli.main(argv) == 0
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    (history,) = row["revisions"]
    assert len(served.served) == 2  # one critique request, one revision request
    (critique_msgs, critique_reply), (revision_msgs, revision_reply) = served.served
    assert critique_msgs[-1]["content"] == history["critique_request"]
    assert history["critique"] == critique_reply["choices"][0]["message"]["content"]
    assert revision_msgs[-2] == {"role": "assistant", "content": history["critique"]}
    assert history["revision"] == revision_reply["choices"][0]["message"]["content"]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32").eval()
    critique, _ = greedy_reply(model, tokenizer, critique_msgs, 5)
    revision, _ = greedy_reply(model, tokenizer, revision_msgs, 5)
    assert (history["critique"], history["revision"]) == (critique, revision)
    assert revision.strip() and critique.strip()  # real text, not the blank a plain greedy tiny model gives
    assert history["gates"] == [] and row["target"] == "revision" and row["completion"] == revision
