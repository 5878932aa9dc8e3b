"""The studio page in a real headless Chromium (Debian's) walking the whole loop on the embedded SmolLM2: upload a
12-conversation set and a card -> preview -> plan -> train 4 steps watching the loss -> chat -> a second run
cancelled -> eval report -> export q8_0 with its parity table. Each step's screenshot goes to docs/studio/."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("playwright")
pytest.importorskip("multipart")

from serving import CHROMIUM, BackgroundServer, browser_page  # noqa: E402

from chatlora.studio import RunsManager, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "studio"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is absent: apt-get install -y chromium"),
]

TOPICS = ["the garden", "the tea", "the letter", "the rain", "the lantern", "the poem", "the music", "the night",
          "the snow", "the plum blossoms", "the palace", "the moon"]  # fmt: skip


def card(path: Path) -> Path:
    """A Character Card V2 in English (the browser has no CJK font for screenshots)."""
    data = {
        "name": "Mira",
        "description": "Mira is the palace's scribe: calm, precise, fond of poems.",
        "personality": "courteous, observant",
        "scenario": "The emperor talks with Mira in the evening.",
        "first_mes": "Your Majesty, the ink is ready.",
    }
    path.write_text(json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": data}), encoding="utf-8")
    return path


def dialogues(path: Path) -> Path:
    """12 multi-turn conversations, two exchanges each."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What do you think of {topic}?"},
                {"role": "assistant", "content": f"Your Majesty, {topic} pleases me greatly today."},
                {"role": "user", "content": "Tell me more."},
                {"role": "assistant", "content": f"I would gladly speak of {topic} for the whole evening."},
            ]
        }
        for topic in TOPICS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    manager = RunsManager(tmp_path_factory.mktemp("studio-runs"))
    with BackgroundServer(create_app(manager)) as srv:
        yield srv
    manager.cancel_all()  # its steps would outlive it


@pytest.fixture(scope="module")
def page(studio):
    # eval and export on a shared 2-core CPU take minutes
    with browser_page(timeout_ms=1_200_000, viewport={"width": 1100, "height": 900}) as page:
        yield page


def shot(page, selector: str, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    path = SHOTS / f"{name}.png"
    page.locator(selector).screenshot(path=str(path))
    Image.open(path).convert("RGB").quantize(64).save(path, optimize=True)  # a small file for the repository


def test_studio_page_walks_the_whole_loop(studio, page, tmp_path):
    """Bug: a step of the page's loop failed in a real browser (uploads, preview marks, plan, the live chart over
    SSE, cancel, eval report, chat, export and its parity table)."""
    opened = time.monotonic()
    page.goto(studio.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    load = page.evaluate(
        "() => { const n = performance.getEntriesByType('navigation')[0];"
        " const r = performance.getEntriesByType('resource');"
        " return {ms: n.loadEventEnd, bytes: n.transferSize + r.reduce((s, e) => s + e.transferSize, 0)}; }"
    )
    timings = {"first_load_ms": round(load["ms"]), "page_bytes": load["bytes"]}

    # 1. bring: the preview marks the template's control tokens and the trained replies
    page.set_input_files("#data", str(dialogues(tmp_path / "court.jsonl")))
    page.set_input_files("#card", str(card(tmp_path / "mira.json")))
    page.fill("#knob-max_steps", "4")
    page.fill("#knob-val_size", "3")
    page.fill("#knob-batch_size", "2")
    page.fill("#knob-save_steps", "2")  # a sample reply at steps 2 and 4
    page.click("#preview-btn")
    page.wait_for_selector(".record .ctl")
    assert "im_start" in page.inner_text(".record .ctl") and page.locator(".record .trn").count() > 0
    assert "12 conversations" in page.inner_text("#stats")
    shot(page, "#bring", "1-preview")

    # 2. plan
    page.click("#plan-btn")
    page.wait_for_selector("#plan:not([hidden])")
    assert "4 optimizer steps" in page.inner_text("#plan") and "9 conversations trained" in page.inner_text("#plan")
    assert "estimated training time ~" in page.inner_text("#plan") and "matmul rate" in page.inner_text("#plan")
    shot(page, "#plan", "2-plan")

    # 3. train 4 steps: the chart gets a point before the run ends
    page.click("#train-btn")
    page.wait_for_function(
        "() => Number(document.getElementById('chart').dataset.points) > 0"
        " && (window.seenWhile = document.getElementById('run').dataset.state)"
    )
    assert page.evaluate("window.seenWhile") == "running"
    page.wait_for_selector("#run[data-state='done']")
    assert int(page.evaluate("document.getElementById('chart').dataset.points")) >= 4  # + the held-out loss
    # the live view's memory against the plan's estimate, and the checkpoint samples: the newest, then the earlier
    memory = page.inner_text("#memory")
    assert "peak memory" in memory and "(process RSS)" in memory and "plan estimated" in memory
    page.wait_for_selector("#samples:not([hidden])")
    assert page.get_attribute("#sample-newest", "data-step") == "4" and page.locator("#sample-list li").count() == 1
    assert page.inner_text("#sample-prompt").startswith("What do you think of")  # the first held-out user turn
    shot(page, "#watch", "3-train")

    # 5. chat with the run and its base, side by side
    page.wait_for_function("document.getElementById('base-name').textContent.includes('embedded')")
    page.fill("#chat-input", "What do you think of the garden?")
    page.press("#chat-input", "Enter")
    page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='1']\").length == 2")
    timings["open_to_first_reply_s"] = round(time.monotonic() - opened, 1)
    assert page.locator(".msg.assistant.error").count() == 0
    assert page.inner_text("#chat-tuned .msg.assistant").strip()
    shot(page, ".chat", "5-chat")
    first = page.inner_text("#run-id")

    # a second run, cancelled while it trains
    page.fill("#knob-max_steps", "500")
    page.click("#train-btn")
    page.wait_for_function(f"document.getElementById('run-id').textContent !== '{first}'")
    page.wait_for_selector("#run[data-state='running']")
    page.click("#cancel-btn")
    page.wait_for_selector("#run[data-state='cancelled']")
    shot(page, "#runs-section", "3b-cancelled")
    page.click(f"#runs tr[data-id='{first}'] button")
    page.wait_for_selector("#run[data-state='done']")

    # 4. judge: the eval report, persona section included
    page.fill("#eval-samples", "3")
    page.fill("#eval-tokens", "24")
    page.click("#eval-btn")
    page.wait_for_selector("#targets tr")
    assert page.frame_locator("iframe").locator("text=Persona").first.is_visible()
    shot(page, "#eval-result", "4-eval")

    # 5. export q8_0 with its parity table, and the downloads
    page.select_option("#quant", "q8_0")
    page.fill("#export-samples", "2")
    page.click("#export-btn")
    page.wait_for_selector("#parity tbody tr")
    statuses = page.eval_on_selector_all("#parity tbody tr td:nth-child(2)", "els => els.map(e => e.textContent)")
    assert "PASS" in statuses and "FAIL" not in statuses, statuses
    page.wait_for_function("document.querySelectorAll('#downloads li').length >= 3")
    assert ".gguf" in page.inner_text("#downloads")
    shot(page, "#run", "6-export")
    print(json.dumps(timings))  # the README's Studio figures
    (SHOTS / "timings.json").write_text(json.dumps(timings, indent=1) + "\n", encoding="utf-8")
