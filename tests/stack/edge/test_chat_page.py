"""The chat page (/) and the dashboard (/dashboard) in headless Chromium against the real stack.

The tiny model's output is random tokens: the tests assert on lengths, states and the stored turns, never
on words. Where a test needs exact model output (HTML injection, refusals, errors) it serves a scripted
stream to the page with Playwright's routing, so the page's real streaming and rendering path runs on it.
Screenshots land in test-artifacts/chat-*.png and dashboard.png.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, Request, Response, Route, expect

from core.config import Settings
from schemas.feedback import DpoPair, dpo_record_id
from tests.browser import artifact, chromium
from tests.conftest import eventually
from topics.ops import read_records
from topics.registry import topic

pytestmark = pytest.mark.stack

TURN_MS = 60_000  # a turn takes 0.1–2 s; generous for a loaded two-core machine

# Records the answer's text length at every DOM change while it streams: the test reads it afterwards.
OBSERVE = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const a = document.querySelector('.answer[data-status="streaming"] .content');
    if (a) window.__lengths.push(a.textContent.length);
  }).observe(document.getElementById('messages'), { subtree: true, childList: true, characterData: true });
}"""
TURNS = "() => window.chatbus.state.conv.exchanges.map(e => e.turns.map(t => ({id: t.id, text: t.text, status: t.status, finish: t.finish})))"
IDLE = "() => !window.chatbus.state.live && document.querySelectorAll('.answer[data-status=streaming]').length === 0"


@asynccontextmanager
async def chat_page(path: str = "/") -> AsyncIterator[tuple[Page, list[str]]]:
    """A fresh browser page at ``path`` (ready), and the list its uncaught page errors go to."""
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 1200, "height": 860})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page, errors


async def open_chat(page: Page, url: str) -> None:
    await page.goto(url)
    await page.wait_for_selector("body[data-ready]", timeout=20_000)


async def ask(page: Page, text: str) -> None:
    await page.fill("#prompt", text)
    await page.press("#prompt", "Enter")


async def wait_idle(page: Page) -> None:
    await page.wait_for_function(IDLE, timeout=TURN_MS)


async def turns(page: Page) -> list[list[dict[str, Any]]]:
    result: list[list[dict[str, Any]]] = await page.evaluate(TURNS)
    return result


async def stored_turn(edge_url: str, conv_id: str, cid: str) -> dict[str, Any]:
    """The turn as ``GET /v1/conversations/{id}`` returns it, once its answer is recorded."""

    async def probe() -> dict[str, Any] | None:
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(f"{edge_url}/v1/conversations/{conv_id}")
        if r.status_code != 200:
            return None
        for t in r.json()["turns"]:
            if t["id"] == cid and t["answer"] is not None:
                return dict(t)
        return None

    return await eventually(probe, timeout_s=30, what=f"stored answer of {cid}")


def feedback_post(r: Any) -> bool:
    return "/v1/feedback" in r.url and r.request.method == "POST"


def body_of(response: Response) -> dict[str, Any]:
    body = response.request.post_data_json
    assert isinstance(body, dict), body
    return body


async def test_answer_streams_in_and_matches_the_stored_turn(edge_url: str) -> None:
    async with chat_page() as (page, errors):
        await open_chat(page, f"{edge_url}/?max_tokens=150")
        await page.evaluate(OBSERVE)
        await ask(page, "Explain Python generators in detail.")
        await wait_idle(page)
        [[turn]] = await turns(page)
        assert turn["status"] == "done" and turn["text"], turn
        lengths = await page.evaluate("window.__lengths")
        growing = sorted({n for n in lengths if n > 0})
        assert len(growing) >= 2, f"the answer should grow while streaming, saw lengths {lengths}"
        conv_id = await page.evaluate("window.chatbus.state.conv.id")
        stored = await stored_turn(edge_url, conv_id, turn["id"])
        assert stored["answer"]["text"] == turn["text"]
        # the conversation is listed (newest first) and selecting it again shows the same turn
        await expect(page.locator(f'#conv-list button[data-id="{conv_id}"]')).to_be_visible(timeout=10_000)
        await page.click(f'#conv-list button[data-id="{conv_id}"]')
        await expect(page.locator(f'.answer[data-cid="{turn["id"]}"]')).to_have_attribute("data-status", "done")
        assert await page.locator(".answer").count() == 1
        await page.screenshot(path=str(artifact("chat-stream.png")))
        assert not errors, errors


async def test_stop_mid_stream_records_a_cancelled_turn(edge_url: str) -> None:
    async with chat_page() as (page, errors):
        await open_chat(page, f"{edge_url}/?max_tokens=400")
        await ask(page, "Write a very long essay about Kafka partitions.")
        await page.wait_for_function("() => Number(document.querySelector('.answer')?.dataset.chars || 0) > 0", timeout=TURN_MS)
        await expect(page.locator("#stop")).to_be_visible()
        await page.click("#stop")
        await wait_idle(page)
        [[turn]] = await turns(page)
        assert turn["status"] == "stopped", turn
        await expect(page.locator(".answer .badge")).to_have_text("Stopped")
        await expect(page.locator("#send")).to_be_visible()
        conv_id = await page.evaluate("window.chatbus.state.conv.id")
        stored = await stored_turn(edge_url, conv_id, turn["id"])
        assert stored["answer"]["finish_reason"] == "cancelled"
        assert stored["answer"]["text"] == turn["text"]
        # a reload shows the stored turn as stopped too
        await page.reload()
        await page.wait_for_selector("body[data-ready]")
        await expect(page.locator(f'.answer[data-cid="{turn["id"]}"]')).to_have_attribute("data-status", "stopped")
        await page.screenshot(path=str(artifact("chat-stopped.png")))
        assert not errors, errors


async def test_regenerate_and_choose_the_better_sibling(edge_url: str, settings: Settings) -> None:
    async with chat_page() as (page, errors):
        await open_chat(page, f"{edge_url}/?max_tokens=24")
        await ask(page, "Name three uses of a dictionary.")
        await wait_idle(page)
        await page.click(".answer .regen")
        await wait_idle(page)
        [[first, second]] = await turns(page)
        assert first["status"] == second["status"] == "done" and first["id"] != second["id"]
        await expect(page.locator(".sib-pos")).to_have_text("2/2")
        await page.click(".siblings .prev")
        await expect(page.locator(".sib-pos")).to_have_text("1/2")
        await expect(page.locator(".answer")).to_have_attribute("data-cid", first["id"])
        async with page.expect_response(feedback_post, timeout=30_000) as info:
            await page.click(".answer .better")
        response = await info.value
        assert response.status == 200, await response.text()
        assert (await response.json())["status"] == "accepted"
        body = body_of(response)
        assert body["type"] == "preference" and body["chosen_id"] == first["id"] and body["rejected_ids"] == [second["id"]]
        assert body["user"] == await page.evaluate("localStorage.getItem('chatbus.user')")
        await expect(page.locator(".answer .preferred")).to_be_visible()
        await expect(page.locator(".answer .better")).to_be_hidden()
        await page.screenshot(path=str(artifact("chat-siblings.png")))
        assert not errors, errors

    # the choice becomes an explicit DPO pair on dpo.pairs (the feedback app), in TRL's conversational format
    async def pair() -> list[DpoPair]:
        out = []
        for r in await read_records(settings, topic("dpo.pairs", settings.topic_prefix)):
            if r.value and r.key and r.key.decode() == dpo_record_id(first["id"], second["id"]):
                out.append(DpoPair.model_validate_json(r.value))
        return out

    found = await eventually(pair, timeout_s=60, what="the chosen sibling as a pair on dpo.pairs")
    assert found[-1].metadata.source == "explicit_preference"
    assert found[-1].chosen[0].role == "assistant" and found[-1].prompt[-1].content == "Name three uses of a dictionary."


async def test_reload_mid_stream_completes_the_turn_once(edge_url: str) -> None:
    async with chat_page() as (page, errors):
        await open_chat(page, f"{edge_url}/?max_tokens=400")
        await ask(page, "Tell me everything about SSE reconnection.")
        await page.wait_for_function(
            "() => { const s = JSON.parse(sessionStorage.getItem('chatbus.inflight') || 'null'); return s && s.lastId && s.text.length > 0; }",
            timeout=TURN_MS,
        )
        before = await page.evaluate("JSON.parse(sessionStorage.getItem('chatbus.inflight'))")
        await page.reload()
        await page.wait_for_selector("body[data-ready]", timeout=20_000)
        await wait_idle(page)
        exchanges = await turns(page)
        assert len(exchanges) == 1 and len(exchanges[0]) == 1, exchanges  # one bubble for the prompt
        [[turn]] = exchanges
        assert turn["id"] == before["id"] and turn["status"] == "done", turn
        assert await page.locator(".exchange").count() == 1 and await page.locator(".answer").count() == 1
        assert turn["text"].startswith(before["text"])
        stored = await stored_turn(edge_url, before["conv"], turn["id"])
        assert stored["answer"]["finish_reason"] in ("stop", "length")  # resumed, not cancelled
        assert stored["answer"]["text"] == turn["text"]  # each character once
        assert await page.evaluate("sessionStorage.getItem('chatbus.inflight')") is None
        await page.screenshot(path=str(artifact("chat-resumed.png")))
        assert not errors, errors


async def test_thumbs_down_with_reason_and_comment_then_change_the_vote(edge_url: str) -> None:
    async with chat_page() as (page, errors):
        await open_chat(page, f"{edge_url}/?max_tokens=24")
        await ask(page, "How do I open a file?")
        await wait_idle(page)
        [[turn]] = await turns(page)
        async with page.expect_response(feedback_post, timeout=30_000) as info:
            await page.click(".answer .thumb.down")
        assert (await info.value).status == 200
        await expect(page.locator(".answer .thumb.down")).to_have_attribute("aria-pressed", "true")
        await expect(page.locator(".answer .fb-form")).to_be_visible()
        await page.locator(".fb-form label", has_text="Didn't follow instructions").click()
        await page.fill(".fb-form .fb-comment", "It ignored the question.")
        await page.screenshot(path=str(artifact("chat-feedback-form.png")))
        async with page.expect_response(feedback_post, timeout=30_000) as info:
            await page.click(".fb-form .fb-send")
        response = await info.value
        assert response.status == 200, await response.text()
        body = body_of(response)
        assert body == {
            "type": "rating",
            "response_id": turn["id"],
            "rating": "down",
            "reason": "ignored_instructions",
            "comment": "It ignored the question.",
            "user": body["user"],
        }
        await expect(page.locator(".answer .fb-form")).to_be_hidden()
        await expect(page.locator(".answer .fb-status")).to_have_text("Thanks — feedback saved")
        # voting again updates the vote
        async with page.expect_response(feedback_post, timeout=30_000) as info:
            await page.click(".answer .thumb.up")
        response = await info.value
        assert response.status == 200 and body_of(response)["rating"] == "up"
        await expect(page.locator(".answer .thumb.up")).to_have_attribute("aria-pressed", "true")
        await expect(page.locator(".answer .thumb.down")).to_have_attribute("aria-pressed", "false")
        await page.screenshot(path=str(artifact("chat-feedback.png")))
        assert not errors, errors


PARSE = """(html) => {
  const doc = new DOMParser().parseFromString(html, 'text/html');
  const els = [...doc.body.querySelectorAll('*')];
  return { tags: els.map(e => e.localName), attrs: els.flatMap(e => [...e.attributes].map(a => a.name)),
           hrefs: els.map(e => e.getAttribute('href')).filter(h => h !== null) };
}"""
INJECTION = (
    '**bold** <img src=x onerror="window.__pwned=1"> <script>window.__pwned=2</script> [link](javascript:window.__pwned=3) ![pic](http://example.invalid/x.png)'
)


async def test_markdown_is_rendered_and_html_never_executed(edge_url: str) -> None:
    async with chat_page() as (page, errors):
        await open_chat(page, f"{edge_url}/")
        html = await page.evaluate("(t) => window.chatbus.renderMarkdown(t)", INJECTION)
        assert "<strong>bold</strong>" in html
        assert "&lt;img src=x" in html and "&lt;script&gt;" in html  # shown as text, not dropped silently
        # what the HTML would build (parsed inertly): no script or img element, no event handler, no js: URL
        parsed = await page.evaluate(PARSE, html)
        assert not {"script", "img", "iframe", "svg"} & set(parsed["tags"]), parsed
        assert not [a for a in parsed["attrs"] if a.startswith("on")], parsed
        assert not [h for h in parsed["hrefs"] if h.strip().lower().startswith("javascript:")], parsed
        table = await page.evaluate("(t) => window.chatbus.renderMarkdown(t)", "| a | b |\n|---|---|\n| 1 | 2 |\n\n```py\nprint(1)\n```")
        assert "<table>" in table and "<code" in table

        # the same text streamed as model output and as a retrieved source, through the page's real path
        stream = sse_body(
            [INJECTION, " more [1]"],
            finish="stop",
            citations=[{"index": 1, "source": '<img src=x onerror="window.__pwned=4">docs/io.md', "position": 2, "score": 0.81}],
        )
        await page.route("**/v1/chat/completions", lambda route: fulfil_sse(route, stream))
        await ask(page, "Render this")
        await wait_idle(page)
        answer = page.locator(".answer")
        await expect(answer).to_have_attribute("data-status", "done")
        assert await answer.locator("strong").count() == 1
        assert await answer.locator("img, script").count() == 0
        assert "<img src=x" in (await answer.locator(".content").text_content() or "")
        await expect(answer.locator(".citations li")).to_have_count(1)
        assert (await answer.locator(".citations .cite-source").text_content()) == '<img src=x onerror="window.__pwned=4">docs/io.md'
        assert await page.evaluate("window.__pwned") is None
        await page.screenshot(path=str(artifact("chat-injection.png")))
        assert not errors, errors


async def test_citations_show_titles_as_links_to_the_documentation(edge_url: str) -> None:
    """A titled citation is a link (http(s) only, new tab, no opener); a javascript: URL is shown as text."""
    cites = [
        {
            "index": 1,
            "source": "/docs/library/textwrap.html",
            "position": 3,
            "score": 0.0331,
            "title": "textwrap — Text wrapping and filling › textwrap.wrap",
            "url": "https://docs.python.org/3.11/library/textwrap.html#textwrap.wrap",
            "snippet": "textwrap.wrap(text, width=70, **kwargs) Wraps the single paragraph in text…",
        },
        {"index": 2, "source": "notes.md", "position": 0, "score": 0.02, "title": "Notes <b>bold</b>", "url": "javascript:window.__pwned=5", "snippet": "s"},
    ]
    async with chat_page() as (page, errors):
        await open_chat(page, f"{edge_url}/")
        await page.route("**/v1/chat/completions", lambda route: fulfil_sse(route, sse_body(["Use textwrap.wrap [1]."], finish="stop", citations=cites)))
        await ask(page, "How do I wrap text?")
        await wait_idle(page)
        answer = page.locator(".answer")
        await expect(answer.locator(".citations li")).to_have_count(2)
        link = answer.locator(".citations li").nth(0).locator("a.cite-link")
        assert await link.text_content() == cites[0]["title"]
        assert await link.get_attribute("href") == cites[0]["url"]
        assert await link.get_attribute("rel") == "noopener noreferrer" and await link.get_attribute("target") == "_blank"
        assert "Wraps the single paragraph" in (await answer.locator(".citations li").nth(0).locator(".cite-snippet").text_content() or "")
        second = answer.locator(".citations li").nth(1)
        assert await second.locator("a").count() == 0 and await second.locator("b").count() == 0
        assert await second.locator(".cite-source").text_content() == "Notes <b>bold</b>"
        assert await page.evaluate("window.__pwned") is None
        await page.screenshot(path=str(artifact("chat-citations.png")))
        assert not errors, errors


async def test_refusals_and_errors_are_shown(edge_url: str) -> None:
    async with chat_page() as (page, errors):
        await open_chat(page, f"{edge_url}/")
        rate_limited = {"error": {"message": "too many turns in flight", "type": "rate_limit_error", "code": "rate_limited"}}
        streams = [
            sse_body(["I can't help with that."], finish="content_filter"),
            None,  # a 429 before the stream starts
            sse_body(["partial"], finish=None, error={"message": "generation failed", "type": "internal_error", "code": None}),
        ]

        async def handler(route: Route, request: Request) -> None:
            body = streams.pop(0)
            if body is None:
                await route.fulfill(status=429, json=rate_limited, headers={"Retry-After": "7"})
            else:
                await fulfil_sse(route, body)

        await page.route("**/v1/chat/completions", handler)
        await ask(page, "refuse me")
        await wait_idle(page)
        first = page.locator(".answer").nth(0)
        await expect(first).to_have_attribute("data-status", "refused")
        await expect(first.locator(".badge")).to_have_text("Refused")
        await ask(page, "rate limit me")
        await wait_idle(page)
        second = page.locator(".answer").nth(1)
        await expect(second).to_have_attribute("data-status", "error")
        await expect(second.locator(".error-box")).to_contain_text("retry after 7 s")
        await ask(page, "fail mid-stream")
        await wait_idle(page)
        third = page.locator(".answer").nth(2)
        await expect(third).to_have_attribute("data-status", "error")
        await expect(third.locator(".error-box")).to_contain_text("generation failed")
        await expect(third.locator(".content")).to_have_text("partial")
        await page.screenshot(path=str(artifact("chat-errors.png")))
        # narrow screens: the conversation list becomes a drawer behind the ☰ button
        await page.set_viewport_size({"width": 390, "height": 800})
        await expect(page.locator("#sidebar")).not_to_be_in_viewport()
        await page.click("#toggle-sidebar")
        await expect(page.locator("#new-conv")).to_be_in_viewport()
        await page.screenshot(path=str(artifact("chat-narrow-drawer.png")))
        await page.mouse.click(375, 400)  # a tap outside the drawer closes it
        await expect(page.locator("#sidebar")).not_to_be_in_viewport()
        await page.screenshot(path=str(artifact("chat-narrow.png")))
        assert not errors, errors


async def test_a_401_asks_for_the_api_key_and_every_call_then_sends_it(edge_url: str) -> None:
    """The stack runs without keys: a route stands in for a server that needs one (and passes the rest on)."""
    async with chat_page() as (page, errors):
        seen: list[str | None] = []

        async def guard(route: Route, request: Request) -> None:
            auth = request.headers.get("authorization")
            seen.append(auth)
            if auth != "Bearer sk-test":
                await route.fulfill(
                    status=401, json={"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error", "code": "invalid_api_key"}}
                )
            else:
                await route.continue_()

        await page.route("**/v1/**", guard)
        await open_chat(page, f"{edge_url}/?max_tokens=8")
        await expect(page.locator("#key-form")).to_be_visible()
        await expect(page.locator("#banner")).to_contain_text("API key")
        await page.fill("#api-key", "sk-test")
        await page.click("#key-form button[type=submit]")
        await expect(page.locator("#model-name")).to_have_text("model: chatbus-tiny-random")
        await ask(page, "hello")
        await wait_idle(page)
        await expect(page.locator(".answer")).to_have_attribute("data-status", "done")
        assert seen[-1] == "Bearer sk-test" and seen.count(None) >= 1
        assert await page.evaluate("localStorage.getItem('chatbus.apiKey')") == "sk-test"
        assert not errors, errors


async def test_dashboard_draws_its_plots(edge_url: str) -> None:
    async with httpx.AsyncClient(timeout=60) as http:  # at least one turn in the window
        r = await http.post(
            f"{edge_url}/v1/chat/completions", json={"model": "chatbus-tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        )
        assert r.status_code == 200
    async with chat_page() as (page, errors):
        await page.goto(f"{edge_url}/dashboard?hours=1")
        await page.wait_for_selector("body[data-updated]", timeout=20_000)
        assert await page.locator("div.uplot canvas").count() == 3  # outcomes, refusal rate, records
        assert int(await page.locator("#k-turns").text_content() or "0") >= 1
        await expect(page.locator("#thumbs-note")).not_to_be_empty()
        # usage and cost (GET /v1/usage; the session stack prices the tiny model): a row once the turn is recorded
        await expect(page.locator("#usage tbody tr").first).to_be_visible(timeout=30_000)
        cells = await page.locator("#usage tbody tr").first.locator("td").all_text_contents()
        assert cells[1] == "chatbus-tiny-random" and int(cells[2]) >= 1 and float(cells[5]) > 0, cells
        assert (await page.locator("#k-cost").text_content() or "").startswith("$")
        await page.screenshot(path=str(artifact("dashboard.png")), full_page=True)
        assert not errors, errors


# --- scripted streams ----------------------------------------------------------------------------------


def sse_body(pieces: list[str], finish: str | None, citations: list[dict[str, Any]] | None = None, error: dict[str, Any] | None = None) -> str:
    """An SSE body in the edge's format: role chunk, content chunks (each with an id), finish, [DONE]."""
    cid = "chatcmpl-scripted"

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "chatbus-tiny-random",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            **extra,
        }

    events = [f"id: {cid}:0:0:0\ndata: {json.dumps(chunk({'role': 'assistant', 'content': ''}))}\n"]
    delivered = 0
    for p in pieces:
        delivered += len(p)
        events.append(f": ping\n\nid: {cid}:0:0:{delivered}\ndata: {json.dumps(chunk({'content': p}))}\n")
    if error is not None:
        events.append(f"data: {json.dumps({'error': error})}\n")
    if finish is not None:
        events.append(f"data: {json.dumps(chunk({}, finish, citations=citations or [], timing={}))}\n")
    events.append("data: [DONE]\n")
    return "\n".join(events) + "\n"


async def fulfil_sse(route: Route, body: str) -> None:
    await route.fulfill(status=200, body=body, headers={"Content-Type": "text/event-stream", "X-Correlation-Id": "chatcmpl-scripted"})
