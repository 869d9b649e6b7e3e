"""The web pages in Debian's Chromium, against the running service, real worker and model.

Every test saves screenshots to test-output/screenshots/; the ``sessions`` fixture also
checks that inputs are labelled, images have alt text, pages fit the window, no script
error happened and no request left 127.0.0.1.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import uuid
from pathlib import Path

import requests
from playwright.sync_api import expect

from tests import support
from tests.web.conftest import PHONE

DOG_IDS = range(151, 269)  # ImageNet class ids 151..268 are dog breeds
BULK_PHOTOS = [
    "dog.jpg",
    "parrot.jpg",
    "cat.bmp",
    "hot_dog.jpg",
    "eagle.jpg",
    "kite.jpg",
    "scream.jpg",
    "sunflower.bmp",
    "bird.bmp",
]


def drop_file(page, selector: str, path: Path, mime: str) -> None:
    """Drag a file onto ``selector`` the way a person drops one from their desktop."""
    transfer = page.evaluate_handle(
        """([data, name, type]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type}));
            return transfer;
        }""",
        [base64.b64encode(path.read_bytes()).decode(), path.name, mime],
    )
    page.dispatch_event(selector, "dragenter", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def test_sign_up_manage_keys_log_out_and_back_in(sessions, live):
    s = sessions(live)
    page = s.page
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/app/login$"))
    s.shot("01-login")

    page.get_by_role("link", name="Create an account").click()
    page.get_by_label("Username").fill("a")
    page.get_by_label("Password").fill("secret1")
    page.get_by_role("button", name="Sign up").click()
    expect(page.locator("#username-error")).to_have_text("That username is too short or too long.")
    s.shot("02-signup-error")

    username = f"ada{uuid.uuid4().hex[:6]}"
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill("correct-horse")
    page.get_by_role("button", name="Sign up").click()
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Welcome, {username}")
    expect(page.locator("#token-balance")).to_have_text("5 tokens")
    expect(page.locator("#account-username")).to_have_text(username)
    first_key = page.locator("#new-key-value").inner_text()
    assert first_key.startswith("ick_")
    expect(page.locator("#curl-example")).to_contain_text(f"Bearer {first_key}")
    rows = page.locator("#keys-body tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(first_key[:12] + "…")
    copy = page.get_by_role("button", name="Copy the API key")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == first_key
    s.shot("03-account-after-signup")

    page.get_by_label("Name of a new key").fill("laptop")
    page.get_by_role("button", name="Create key").click()
    expect(rows).to_have_count(2)
    expect(page.locator("#keys-message")).to_have_text("Created the key “laptop”.")
    new_key = page.locator("#new-key-value").inner_text()
    assert new_key.startswith("ick_") and new_key != first_key
    expect(page.locator("#curl-example")).to_contain_text(f"Bearer {new_key}")
    page.get_by_role("button", name=re.compile("Revoke the key “default”")).click()
    expect(page.locator("#keys-message")).to_contain_text("Revoked the key “default”")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("laptop")
    assert requests.get(f"{live.url}/v1/me", headers=support.bearer(first_key)).status_code == 401
    assert requests.get(f"{live.url}/v1/me", headers=support.bearer(new_key)).status_code == 200
    s.shot("04-account-keys")
    s.shot("04-account-keys-phone", viewport=PHONE)

    page.get_by_role("button", name="Log out").click()
    expect(page.locator(".flash")).to_have_text("You have logged out.")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill("wrong-horse")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#form-error")).to_have_text("Wrong username or password.")
    s.shot("05-login-wrong-password")
    page.get_by_label("Password").fill("correct-horse")
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(re.compile(r"/app/classify$"))


def test_classify_a_dropped_upload_and_a_pasted_url(sessions, live, photo_server, photos_dir):
    s = sessions(live)
    s.log_in(live.new_user())
    page = s.page
    balance = page.locator("#token-balance")
    bars = page.locator("#bars li")
    expect(balance).to_have_text("5 tokens")
    s.shot("10-classify-empty")

    drop_file(page, "#dropzone", photos_dir / "dog.jpg", "image/jpeg")
    expect(page.locator("#preview-img")).to_be_visible()
    expect(page.locator("#preview-name")).to_contain_text("dog.jpg")
    page.get_by_role("button", name="Classify").click()
    expect(page.locator("#job-badge")).to_have_text("Succeeded")
    expect(bars).to_have_count(5)
    assert int(bars.first.get_attribute("data-class-id")) in DOG_IDS
    expect(bars.first.locator(".bar-value")).to_have_text(re.compile(r"^\d+\.\d%$"))
    expect(page.locator("#job-status")).to_contain_text("Most likely: ")
    expect(balance).to_have_text("4 tokens")
    s.shot("11-classify-upload-dog")

    page.get_by_label("Image URL").fill(photo_server.url("parrot.jpg"))
    expect(page.locator("#preview-img")).to_have_attribute("src", photo_server.url("parrot.jpg"))
    page.get_by_role("button", name="Classify").click()
    expect(bars.first).to_have_attribute("data-label", "macaw")
    expect(bars.first.locator(".bar-label")).to_have_text("macaw")
    expect(balance).to_have_text("3 tokens")
    s.shot("12-classify-url-parrot")


def test_classify_on_a_phone_with_the_keyboard(sessions, live, photo_server):
    s = sessions(live, PHONE)
    s.log_in(live.new_user())
    page = s.page
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    order = []
    for _ in range(14):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
    assert order.index("file") < order.index("url") < order.index("classify-submit"), order

    page.get_by_label("Image URL").fill(photo_server.url("parrot.jpg"))
    page.get_by_label("Image URL").press("Enter")
    expect(page.locator("#bars li").first).to_have_attribute("data-label", "macaw")
    expect(page.locator("#token-balance")).to_have_text("4 tokens")
    s.shot("13-classify-phone")


def test_classify_errors_read_as_sentences(sessions, live, photo_server, tmp_path):
    s = sessions(live)
    s.log_in(live.new_user())
    page = s.page
    error = page.locator("#classify-error")
    submit = page.get_by_role("button", name="Classify")

    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a picture\n")
    page.locator("#file").set_input_files(notes)
    submit.click()
    expect(error).to_have_text(
        "That file isn’t an image we can read. Choose a JPEG, PNG, GIF, WebP or BMP file."
    )
    s.shot("14-classify-not-an-image")

    # Picked in the page itself: sending 20 MB through Playwright takes half a minute.
    page.evaluate(
        """() => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([new Uint8Array(20 * 1048576 + 1)], "huge.jpg"));
            const input = document.getElementById("file");
            input.files = transfer.files;
            input.dispatchEvent(new Event("change", {bubbles: true}));
        }"""
    )
    submit.click()
    expect(error).to_have_text("That file is too large. Images can be up to 20 MB.")

    page.get_by_label("Image URL").fill("example.com/cat.jpg")
    submit.click()
    expect(error).to_contain_text("Paste a full URL that starts with http:// or https://.")

    page.get_by_label("Image URL").fill(photo_server.url("notes.jpg"))
    submit.click()
    expect(error).to_have_text(
        "That URL doesn’t lead to an image we can read. Link directly to a JPEG, PNG, GIF,"
        " WebP or BMP file. Your token was refunded."
    )
    expect(page.locator("#job-badge")).to_have_text("Failed")

    page.get_by_label("Image URL").fill("http://127.0.0.1:9/photo.jpg")
    submit.click()
    expect(error).to_have_text(
        "We couldn’t download an image from that URL. Check the address and that the site"
        " is reachable. Your token was refunded."
    )
    expect(page.locator("#token-balance")).to_have_text("5 tokens")
    s.shot("15-classify-unreachable-url")


def test_bulk_batch_with_live_progress_downloads_and_history(sessions, live, photo_server):
    user = live.new_user()
    admin = sessions(live)
    admin.log_in(live.new_admin())
    admin.page.goto(f"/app/admin?q={user['username']}")
    row = admin.page.locator(f'tr[data-username="{user["username"]}"]')
    row.get_by_label(f"Tokens to add for {user['username']}").fill("20")
    row.get_by_role("button", name="Add tokens").click()
    expect(admin.page.locator("#admin-message")).to_have_text(
        f"Added 20 tokens to {user['username']}. New balance: 25 tokens."
    )
    expect(row.locator(".user-tokens")).to_have_text("25")
    admin.shot("20-admin-refill")
    admin.shot("20-admin-refill-phone", viewport=PHONE)

    s = sessions(live)
    page = s.page
    # Record every value the progress bar shows, from the moment the batch page loads.
    page.add_init_script(
        """document.addEventListener("DOMContentLoaded", () => {
            const bar = document.getElementById("progress");
            if (!bar) return;
            window.seen = [bar.getAttribute("aria-valuenow")];
            new MutationObserver(() => window.seen.push(bar.getAttribute("aria-valuenow")))
                .observe(bar, {attributes: true, attributeFilter: ["aria-valuenow"]});
        });"""
    )
    s.log_in(user)
    page.get_by_role("link", name="Bulk").click()
    urls = [photo_server.url(name) for name in BULK_PHOTOS] + [photo_server.url("notes.jpg")]
    page.get_by_label("Image URLs, one per line").fill("\n".join(urls))
    expect(page.locator("#url-count")).to_have_text("10 URLs · costs 10 tokens")
    s.shot("21-bulk-form")
    page.get_by_role("button", name="Start batch").click()

    expect(page).to_have_url(re.compile(r"/app/batches/[0-9a-f-]+$"))
    expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#batch-badge")).to_have_text("Completed")
    expect(page.locator("#count-succeeded")).to_have_text("9")
    expect(page.locator("#count-failed")).to_have_text("1")
    expect(page.locator("#count-remaining")).to_have_text("0")
    expect(page.locator("#progress-text")).to_have_text("10 of 10 images done")
    results = page.locator("#results-body tr")
    expect(results).to_have_count(10)
    expect(results.nth(1).locator(".top-label")).to_have_text("macaw")
    expect(results.nth(9).locator(".result")).to_have_text("Not an image")
    expect(page.get_by_role("button", name="Cancel batch")).to_be_hidden()
    seen = [int(v) for v in page.evaluate("window.seen")]
    assert seen[-1] == 100 and seen == sorted(seen), seen
    expect(page.locator("#token-balance")).to_have_text("16 tokens")  # 25 - 10 + 1 refund
    page.wait_for_function(
        "[...document.querySelectorAll('img.thumb')].every(i => i.complete && i.naturalWidth)"
    )
    s.shot("22-batch-completed")
    s.shot("22-batch-completed-phone", viewport=PHONE)

    with page.expect_download() as download:
        page.get_by_role("link", name="Download CSV").click()
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert [r["url"] for r in rows] == urls
    assert rows[1]["top_label"] == "macaw" and rows[9]["error_code"] == "not_an_image"
    with page.expect_download() as download:
        page.get_by_role("link", name="Download JSONL").click()
    lines = Path(download.value.path()).read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines] == ["succeeded"] * 9 + ["failed"]

    page.get_by_role("link", name="Classify").click()
    page.get_by_label("Image URL").fill(photo_server.url("hot_dog.jpg"))
    page.get_by_role("button", name="Classify").click()
    expect(page.locator("#job-badge")).to_have_text("Succeeded")
    page.get_by_role("link", name="History").click()
    expect(page.locator("section", has_text="Batches").locator("tbody tr")).to_have_count(1)
    expect(
        page.get_by_role("link", name=re.compile(r"^Batch [0-9a-f]{8}, 10 URLs$"))
    ).to_be_visible()
    jobs = page.locator("section", has_text="Single images").locator("tbody tr")
    expect(jobs).to_have_count(1)
    expect(jobs.first).to_contain_text("hotdog")
    s.shot("23-history")
    s.shot("23-history-phone", viewport=PHONE)
    page.get_by_role("link", name=photo_server.url("hot_dog.jpg")).click()
    expect(page.locator("#job-badge")).to_have_text("Succeeded")
    expect(page.locator("#bars li").first).to_have_attribute("data-label", "hotdog")
    s.shot("24-job")
    page.get_by_role("button", name="Delete job").click()  # the confirm() is accepted
    expect(page).to_have_url(re.compile(r"/app/history$"))
    expect(page.get_by_text("No images yet.")).to_be_visible()
    expect(page.locator("#token-balance")).to_have_text("15 tokens")  # nothing refunded


def test_json_lines_batch_shows_custom_ids_and_retries_a_failed_line(sessions, live, photo_server):
    s = sessions(live)
    page = s.page
    s.log_in(live.new_user())
    key = uuid.uuid4().hex
    items = [
        {"custom_id": "sku-1", "url": photo_server.url("parrot.jpg")},
        {"custom_id": "sku-2", "url": photo_server.url(f"down/{key}/hot_dog.jpg")},
    ]
    page.get_by_role("link", name="Bulk").click()
    page.get_by_label("Image URLs, one per line").fill("\n".join(json.dumps(i) for i in items))
    expect(page.locator("#url-count")).to_have_text("2 URLs · costs 2 tokens")
    page.get_by_role("button", name="Start batch").click()

    expect(page.locator("#batch-badge")).to_have_text("Completed")
    expect(page.locator("#count-failed")).to_have_text("1")
    results = page.locator("#results-body tr")
    expect(results.nth(0).locator(".custom-id")).to_have_text("sku-1")
    expect(results.nth(1).locator(".result")).to_have_text("Download failed")
    expect(page.locator("#token-balance")).to_have_text("4 tokens")  # 5 - 2 + 1 refund
    retry = page.get_by_role("button", name="Retry 1 failed image")
    expect(retry).to_be_visible()
    s.shot("25-batch-with-a-failed-line")

    photo_server.gate(key).set()  # the image host is back
    retry.click()  # the confirm() is accepted
    expect(page.locator("#batch-message")).to_have_text("1 image queued again.")
    expect(page.locator("#batch-badge")).to_have_text("Completed")
    expect(page.locator("#count-succeeded")).to_have_text("2")
    expect(page.locator("#count-failed")).to_have_text("0")
    expect(results.nth(1).locator(".top-label")).to_have_text("hotdog")
    expect(retry).to_be_hidden()
    expect(page.locator("#token-balance")).to_have_text("3 tokens")
    s.shot("26-batch-retried")

    with page.expect_download() as download:
        page.get_by_role("link", name="Download CSV").click()
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert [(r["custom_id"], r["top_label"], r["retries"]) for r in rows] == [
        ("sku-1", "macaw", "0"),
        ("sku-2", "hotdog", "1"),
    ]


def test_queued_work_cancel_and_running_out_of_tokens(sessions, idle, photo_server):
    """On a service whose worker is away: queued states, cancel with refund, an empty wallet."""
    s = sessions(idle)
    s.log_in(idle.new_user())
    page = s.page
    balance = page.locator("#token-balance")

    page.get_by_label("Image URL").fill(photo_server.url("eagle.jpg"))
    page.get_by_role("button", name="Classify").click()
    expect(page.locator("#job-badge")).to_have_text("Queued")
    expect(page.locator("#job-status")).to_have_text("Queued: waiting for a worker…")
    expect(balance).to_have_text("4 tokens")
    s.shot("30-classify-queued")

    page.get_by_role("link", name="Bulk").click()
    textarea = page.get_by_label("Image URLs, one per line")
    textarea.fill(f"{photo_server.url('kite.jpg')}\nnot a url\n# a comment\nftp://x/y.jpg")
    page.get_by_role("button", name="Start batch").click()
    expect(page.locator("#bulk-error")).to_have_text(
        "Lines 2 and 4 aren’t web addresses. Each line must be a full URL that starts with"
        " http:// or https://. Nothing was charged."
    )
    textarea.fill("\n".join(photo_server.url(n) for n in BULK_PHOTOS))
    expect(page.locator("#url-count")).to_have_text("9 URLs · costs 9 tokens (you have 4 tokens)")
    page.get_by_role("button", name="Start batch").click()
    expect(page.locator("#bulk-error")).to_have_text(
        "Not enough tokens: this batch needs 9 tokens and you have 4 tokens. Remove some URLs,"
        " or ask an administrator to refill your balance."
    )
    s.shot("31-bulk-not-enough-tokens")

    textarea.fill("\n".join(photo_server.url(n) for n in BULK_PHOTOS[:3]))
    page.get_by_role("button", name="Start batch").click()
    expect(page.locator("#batch-badge")).to_have_text("Queued")
    expect(page.locator("#count-remaining")).to_have_text("3")
    expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "0")
    expect(balance).to_have_text("1 token")
    s.shot("32-batch-queued")
    page.get_by_role("button", name="Cancel batch").click()  # the confirm() is accepted
    expect(page.locator("#batch-badge")).to_have_text("Canceled")
    expect(page.locator("#count-canceled")).to_have_text("3")
    expect(page.locator("#progress-text")).to_have_text("Canceled with 0 of 3 images processed")
    expect(page.locator("#batch-message")).to_have_text(
        "Batch canceled. 3 tokens refunded for images that had not started."
    )
    expect(page.get_by_role("button", name="Cancel batch")).to_be_hidden()
    expect(balance).to_have_text("4 tokens")
    s.shot("33-batch-canceled")
    page.get_by_role("button", name="Delete batch").click()  # the confirm() is accepted
    expect(page).to_have_url(re.compile(r"/app/history$"))
    expect(page.get_by_text("No batches yet.")).to_be_visible()
    page.get_by_role("link", name=photo_server.url("eagle.jpg")).click()
    expect(page.locator("#job-badge")).to_have_text("Queued")
    expect(page.get_by_role("button", name="Delete job")).to_be_hidden()  # not finished

    page.get_by_role("link", name="Bulk").click()
    textarea.fill("\n".join(photo_server.url(n) for n in BULK_PHOTOS[:4]))
    page.get_by_role("button", name="Start batch").click()
    expect(page.locator("#batch-badge")).to_have_text("Queued")
    expect(balance).to_have_text("0 tokens")
    page.get_by_role("link", name="Classify").click()
    page.get_by_label("Image URL").fill(photo_server.url("dog.jpg"))
    page.get_by_role("button", name="Classify").click()
    expect(page.locator("#classify-error")).to_have_text(
        "You’re out of tokens. Each image costs one token; ask an administrator to refill"
        " your balance."
    )
    s.shot("34-classify-out-of-tokens")
