"""The labelling page in a real headless Chromium (Debian `chromium`, driven by Playwright): a person labels pairs
by clicking and by keyboard, a double click records one judgement, typing a reason never judges, replies are
shown as text (never as HTML), and the export holds exactly what was clicked. Saves a screenshot
(tests/artifacts/label_page.png) for the README."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cakelm.data.labels import LabelStore, export
from cakelm.data.prefs import read_prefs
from cakelm.label import create_label_app
from tests.serving import CHROMIUM, launch_chromium, running

ARTIFACTS = Path(__file__).parent / "artifacts"

# CI sets CAKELM_REQUIRE_BROWSER=1 so a missing browser fails instead of skipping.
pytestmark = pytest.mark.skipif(not CHROMIUM and not os.environ.get("CAKELM_REQUIRE_BROWSER"),
                                reason="Debian chromium is not installed (apt-get install chromium)")

SYSTEM = {"role": "system", "content": "You are a friendly, concise assistant."}
# the pair on the README's screenshot
SHOWCASE = ([SYSTEM, {"role": "user", "content": "What's a good way to start learning to cook?"}],
            "Pick three simple dishes you already like, say an omelette, a pasta and a stir-fry, and cook each of "
            "them a few times this week. Taste as you go, and learn to hold a knife safely before you learn to chop "
            "fast.",
            "Cooking is the process of preparing food with heat. Cooking is the process of preparing food with "
            "heat. Cooking is the process of")
PAIRS = [  # (prompt, reply a, reply b): what a small chat model's two samples look like, hand-written
    ([{"role": "user", "content": "How many legs does a spider have?"}], "Six, like every other insect.",
     "A spider has eight legs. (Spiders are arachnids, not insects, which have six.)"),
    ([{"role": "user", "content": "I had a rough day at work."}],
     "I'm sorry to hear that. Do you want to talk about what happened, or would you rather take your mind off it?",
     "ok"),
    ([{"role": "user", "content": "What is 12 + 30?"}], "12 + 30 = 42.", "12 + 30 = 42. The answer is 42."),
    ([{"role": "user", "content": "Any tips for sleeping better?"}],
     "Keep the same bedtime every night, dim the lights an hour before, and leave your phone in another room.",
     "Sleep is good. You should sleep. Sleeping more is better than sleeping less because sleep is good."),
    ([{"role": "user", "content": "How do I make text bold in HTML?"}],
     "Wrap it in a b or strong tag: <b>bold</b> & done.",
     "Use <script>document.title='pwned'</script> and <img src=x onerror=alert(1)>."),
    ([{"role": "user", "content": "Can you recommend a book for a long train ride?"}],
     "Try \"The Hitchhiker's Guide to the Galaxy\": short chapters, easy to pick up and put down, and funny.",
     "Books are made of paper. There are many books. I recommend reading a book on the train."),
]


def test_label_page_records_exactly_what_was_clicked(tmp_path) -> None:
    from playwright.sync_api import expect, sync_playwright

    store = LabelStore(tmp_path / "label.db")
    by_question: dict[str, tuple[str, str, str]] = {}

    def add(pairs: list[tuple]) -> None:
        ids = store.add_pairs([{"prompt": p, "a": a, "b": b, "ended_a": True, "ended_b": True, "model_a": "runs/x/sft",
                                "model_b": "runs/x/sft", "fields": {}} for p, a, b in pairs])
        by_question.update({p[-1]["content"]: (i, a, b) for i, (p, a, b) in zip(ids, pairs)})

    add(PAIRS)
    app = create_label_app(store, token="tok3n")  # progress against every pair
    done: dict[str, str] = {}  # pair id -> the choice made on the page
    with running(app) as url, sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: (errors.append("dialog: " + d.message), d.dismiss()))
            posts: list[str] = []  # judgements the page sent: one per decision, a double click included
            page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
            page.goto(url + "/?token=tok3n")
            page.fill("#name-input", "alice")
            page.click("#name-start")

            def shown() -> str:
                """The pair on screen (its id), after checking the page shows its texts as text."""
                expect(page.locator("#choice-a")).to_be_enabled()
                question = page.locator("#prompt .msg").last.text_content().removeprefix("user")
                pid, a, b = by_question[question]
                assert page.locator("#reply-a").text_content() == a and page.locator("#reply-b").text_content() == b
                assert page.locator("#reply-a *, #reply-b *").count() == 0  # no element made from a reply
                return pid

            def judged(n: int, others: int = 0) -> None:
                expect(page.locator("#mine")).to_have_text(f"you: {n}")
                assert len(store.judgements()) == n + others

            for n, button in enumerate(["#choice-a", "#choice-b", "#choice-tie"], 1):
                pid = shown()
                page.click(button)
                done[pid] = button.removeprefix("#choice-")
                judged(n)
            # keyboard: typing a reason never judges (it is full of shortcut keys); Esc leaves the box, then "2" does
            pid = shown()
            reason = "b has 8 legs, right? a tie: 1 x no"
            page.locator("#reason").press_sequentially(reason)
            page.wait_for_timeout(200)
            assert len(store.judgements()) == 3
            page.press("#reason", "Escape")
            page.keyboard.press("2")
            done[pid] = "b"
            judged(4)
            assert store.judgements()[-1]["reason"] == reason
            # a double click records one judgement
            pid = shown()
            page.dblclick("#choice-both_bad")
            done[pid] = "both_bad"
            judged(5)
            expect(page.locator("#progress")).to_have_text(f"labelled 5 / {len(PAIRS)}")
            shown()
            page.wait_for_timeout(300)
            assert len(store.judgements()) == 5 and len(posts) == 5 and not errors, (posts, errors)

            # the export holds exactly those judgements: the A/B ones as pairs, the tie and both-bad counted
            out = tmp_path / "labelled.jsonl"
            counts = export(store.path, out)
            assert counts["exported"] == 3 and counts["ties"] == 1 and counts["both_bad"] == 1
            assert counts["unlabelled"] == len(PAIRS) - 5
            rows, _ = read_prefs(out)
            wins = {pid: c for pid, c in done.items() if c in ("a", "b")}
            assert {r.fields["pair_id"]: r.chosen for r in rows} == {
                pid: by_question[store.pair(pid)["prompt"][-1]["content"]][1 if c == "a" else 2]
                for pid, c in wins.items()}
            assert all(r.fields["labellers"] == ["alice"] for r in rows)

            # a second person's labels make agreement show up
            judged_ids = list(done)
            store.record(judged_ids[0], "bob", done[judged_ids[0]])
            store.record(judged_ids[1], "bob", "tie" if done[judged_ids[1]] != "tie" else "a")
            page.reload()
            expect(page.locator("#agreement")).to_have_text("agreement 50% on 2 pairs")
            # the last pair, then the end
            shown()
            page.click("#choice-a")
            judged(6, others=2)
            expect(page.locator("#done")).to_contain_text("No pairs left")
            expect(page.locator("#work")).to_be_hidden()
            assert len(posts) == 6 and not errors, (posts, errors)

            # a new pair appears after a reload; the README's screenshot is of it
            add([SHOWCASE])
            page.reload()
            assert shown() == by_question[SHOWCASE[0][-1]["content"]][0]
            expect(page.locator("#progress")).to_have_text(f"labelled 6 / {len(PAIRS) + 1}")
            assert page.locator("#prompt .msg").first.text_content() == "system" + SYSTEM["content"]
            page.fill("#reason", "A answers it; B repeats itself")
            page.locator("#choice-a").hover()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "label_page.png"))

            # a wrong token is shown, not swallowed
            page.goto(url + "/?token=wrong")
            expect(page.locator("#error")).to_contain_text("access token")
        finally:
            browser.close()
    assert len([j for j in store.judgements() if j["labeller"] == "alice"]) == len(PAIRS) and not errors
    assert (ARTIFACTS / "label_page.png").stat().st_size > 20_000
    store.close()
