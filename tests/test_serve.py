"""muse-serve: the JSON API against the Python pipeline, bit for bit, and the page in a browser.

The first tests use a stand-in pipeline (no model: validation, errors, queueing); the slow ones an
exported smoke cascade. MUSE_SCREENSHOT=docs/serve.png writes the browser test's screenshot.
"""

import base64
import io
import os
import socket
import subprocess
import threading
import time
import types

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, start_python

CHROMIUM = "/usr/bin/chromium"
PROMPT = "a large red circle in the center"
NUM_IMAGES = 4  # One count everywhere: the in-process pipeline compiles one program.


def decode(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,"), data_url[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def data_url(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ----------------------------------------------------------------------------- no model


class FakePipe:
    """Records calls and how many run at once; images filled with the seed."""

    config = types.SimpleNamespace(
        base=types.SimpleNamespace(sampling={"guidance_scale": 3.0, "num_steps": 4})
    )

    def __init__(self, delay=0.0, fail=None):
        self.delay, self.fail = delay, fail
        self.calls, self.active, self.most_active = [], 0, 0
        self.lock = threading.Lock()

    def image_size(self, stages=None):
        return 8

    def __call__(self, prompts, **kwargs):
        from muse_jax.inference.pipeline import check_prompt

        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            for p in prompts:
                check_prompt(p)
            self.calls.append(kwargs)
            time.sleep(self.delay)
            if self.fail:
                raise self.fail
            n = kwargs["num_images_per_prompt"]
            return types.SimpleNamespace(array=np.full((n, 8, 8, 3), kwargs["seed"], np.uint8))
        finally:
            with self.lock:
                self.active -= 1


def client(pipe, **kwargs):
    from fastapi.testclient import TestClient

    from muse_jax.serve import create_app

    return TestClient(create_app(pipe, **kwargs))


def test_page_has_the_controls():
    r = client(FakePipe(), max_images=6).get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for element in (
        'id="prompt"',
        'id="negative_prompt"',
        'id="guidance_scale"',
        'id="num_steps"',
        'id="seed"',
        'id="num_images"',
        'id="generate"',
        'id="grid"',
        'id="error"',
        'id="image"',
        'id="mask"',
        'id="inpaint"',
    ):
        assert element in r.text
    assert '"max_images": 6' in r.text and "__DEFAULTS__" not in r.text


def test_settings_reach_the_pipeline_and_defaults_fill_the_rest():
    pipe = FakePipe()
    c = client(pipe, max_images=6)
    r = c.post(
        "/api/generate",
        json={"prompt": "a red circle", "guidance_scale": 2.5, "num_steps": 3, "seed": 7,
              "num_images": 3, "negative_prompt": "a blue square"},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 3 and body["seconds"] >= 0
    assert (decode(body["images"][0]) == 7).all()
    assert pipe.calls[-1] == {
        "negative_prompt": "a blue square",
        "guidance_scale": 2.5,
        "num_steps": 3,
        "seed": 7,
        "num_images_per_prompt": 3,
    }
    assert c.post(
        "/api/generate", json={"prompt": "a red circle", "negative_prompt": ""}
    ).is_success
    assert pipe.calls[-1] == {
        "negative_prompt": None,
        "guidance_scale": None,
        "num_steps": None,
        "seed": 0,
        "num_images_per_prompt": 4,
    }


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": ""}, "Empty prompt"),
        ({"prompt": "   "}, "Empty prompt"),
        ({}, "Empty prompt"),
        ({"prompt": "x" * 1001}, "at most 1000"),
        ({"prompt": "a", "negative_prompt": "x" * 1001}, "negative prompt has 1001"),
        ({"prompt": 3}, "prompt must be a string"),
        ({"prompt": "a", "num_images": 7}, "at most 6 per request"),
        ({"prompt": "a", "num_images": 0}, "num_images must be >= 1"),
        ({"prompt": "a", "num_steps": 2.5}, "num_steps must be a whole number"),
        ({"prompt": "a", "num_steps": 0}, "num_steps must be between 1 and 256"),
        ({"prompt": "a", "guidance_scale": -1}, "guidance_scale must be between 0 and 100"),
        ({"prompt": "a", "guidance_scale": "lots"}, "guidance_scale must be a number"),
        ({"prompt": "a", "seed": -1}, "seed must be between 0 and 4294967295"),
        ({"prompt": "a", "seed": True}, "seed must be a number"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_input_is_a_400_with_one_line(body, message):
    pipe = FakePipe()
    r = client(pipe, max_images=6).post("/api/generate", json=body)
    assert r.status_code == 400
    assert message in r.json()["error"] and "\n" not in r.json()["error"]
    assert not pipe.calls


def test_bad_json_and_bad_uploads_are_400s():
    c = client(FakePipe())
    r = c.post("/api/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = c.post("/api/inpaint", json={"prompt": "a red circle", "mask": "data:image/png;base64,"})
    assert r.status_code == 400 and r.json()["error"].startswith("image is missing")
    image = data_url(np.zeros((8, 8, 3), np.uint8))
    r = c.post("/api/inpaint", json={"prompt": "a", "image": image, "mask": "data:,@@"})
    assert r.status_code == 400 and "mask is not valid base64" in r.json()["error"]
    junk = "data:image/png;base64," + base64.b64encode(b"not a png").decode()
    r = c.post("/api/inpaint", json={"prompt": "a", "image": image, "mask": junk})
    assert r.status_code == 400 and "mask is not an image" in r.json()["error"]


def test_an_unexpected_failure_is_a_500_with_one_line():
    pipe = FakePipe(fail=RuntimeError("device lost\nTraceback (most recent call last): ..."))
    r = client(pipe).post("/api/generate", json={"prompt": "a red circle"})
    assert r.status_code == 500
    assert r.json() == {"error": "RuntimeError: device lost"}


def test_requests_are_queued_one_at_a_time():
    from fastapi.testclient import TestClient

    from muse_jax.serve import create_app

    pipe = FakePipe(delay=0.2)
    results = []
    with TestClient(create_app(pipe)) as c:

        def post(seed):
            r = c.post("/api/generate", json={"prompt": "a red circle", "seed": seed})
            results.append((seed, r.status_code, decode(r.json()["images"][0])[0, 0, 0]))

        threads = [threading.Thread(target=post, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        assert c.get("/").status_code == 200  # The page still answers while the queue runs.
        for t in threads:
            t.join()
    assert sorted(results) == [(s, 200, s) for s in range(4)]
    assert pipe.most_active == 1 and len(pipe.calls) == 4


# ----------------------------------------------------------------------------- exported model


@pytest.fixture(scope="module")
def model_dir(trained_cascade, tmp_path_factory):
    from muse_jax.inference import export, model

    config, workdir = trained_cascade
    out = str(tmp_path_factory.mktemp("serve") / "model")
    export.export(model.from_workdir(config, workdir), out, source=workdir)
    return out


@pytest.fixture(scope="module")
def pipe(model_dir):
    from muse_jax import MusePipeline

    return MusePipeline.from_pretrained(model_dir)


@pytest.mark.slow
def test_generate_matches_the_pipeline_bit_for_bit(pipe):
    from muse_jax.inference.images import preview_grid

    body = {"prompt": PROMPT, "seed": 5, "num_images": NUM_IMAGES, "guidance_scale": 2.0}
    r = client(pipe).post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    got = np.stack([decode(u) for u in r.json()["images"]])
    want = pipe(PROMPT, seed=5, num_images_per_prompt=NUM_IMAGES, guidance_scale=2.0).array
    size = pipe.image_size()
    assert got.shape == (NUM_IMAGES, size, size, 3)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(decode(r.json()["grid"]), preview_grid(want, 4, 128))


@pytest.mark.slow
def test_pipeline_errors_are_400s(pipe):
    c = client(pipe, max_images=NUM_IMAGES)
    for body, message in [
        ({"prompt": ""}, "Empty prompt: give a caption, e.g. 'a red circle'."),
        ({"prompt": "a" * 1001}, "The prompt has 1001 characters; at most 1000 are accepted."),
        ({"prompt": PROMPT, "num_images": NUM_IMAGES + 1}, "5 images requested; this server"),
    ]:
        r = c.post("/api/generate", json=body)
        assert r.status_code == 400 and r.json()["error"].startswith(message)


@pytest.mark.slow
def test_inpaint_matches_the_pipeline(pipe):
    from muse_jax.data import shapes

    size = pipe.image_size()
    scene = shapes.scene_from_caption(PROMPT, np.random.default_rng(0))
    image = shapes.render(scene, size)
    mask = shapes.object_mask(scene.objects[0], size).astype(np.uint8) * 255
    body = {"prompt": "a large blue circle in the center", "seed": 1, "num_images": 2}
    r = client(pipe).post(
        "/api/inpaint", json={**body, "image": data_url(image), "mask": data_url(mask)}
    )
    assert r.status_code == 200, r.text
    got = np.stack([decode(u) for u in r.json()["images"]])
    assert got.shape == (2, size, size, 3)
    want = pipe.inpaint(image, mask, body["prompt"], num_images=2, seed=1).array
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        got[:, mask == 0], np.broadcast_to(image[mask == 0], got[:, mask == 0].shape)
    )
    r = client(pipe).post(
        "/api/inpaint",
        json={**body, "image": data_url(image), "mask": data_url(np.zeros((size, size), np.uint8))},
    )
    assert r.status_code == 400 and "no white pixels" in r.json()["error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(proc, url: str, log_path: str, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path) as f:
                pytest.fail(f"muse-serve exited with {proc.returncode}:\n{f.read()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"muse-serve did not answer at {url} within {timeout:.0f}s")


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="needs Debian's Chromium: apt-get install -y chromium"
)
def test_the_page_in_a_browser(pipe, model_dir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    from muse_jax.data import shapes
    from muse_jax.data import shapes_alignment as alignment
    from muse_jax.inference.images import preview_grid

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = str(tmp_path / "serve.log")
    with open(log_path, "w") as log:
        proc = start_python(
            "-m", "muse_jax.serve", f"--model={model_dir}", f"--port={port}", stdout=log
        )
    try:
        _wait_until_up(proc, url, log_path)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update",
                      "--disable-sync"],
            )  # fmt: skip
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 720})
                page.goto(url)
                page.fill("#prompt", PROMPT)
                page.fill("#seed", "11")
                page.fill("#num_images", str(NUM_IMAGES))
                page.click("#generate")
                page.wait_for_function(
                    "document.getElementById('grid').getAttribute('src') || "
                    "document.getElementById('error').textContent",
                    timeout=180_000,
                )
                assert page.text_content("#error") == ""
                assert page.evaluate("document.getElementById('grid').naturalWidth") > 0
                grid = decode(page.get_attribute("#grid", "src"))
                links = page.eval_on_selector_all("#links a", "els => els.map(a => a.href)")
                shown = np.stack([decode(u) for u in links])
                if os.environ.get("MUSE_SCREENSHOT"):
                    path = os.path.join(ROOT, os.environ["MUSE_SCREENSHOT"])
                    page.screenshot(path=path, full_page=True)

                # The page's settings are the model's defaults: the same images from Python.
                want = pipe(PROMPT, seed=11, num_images_per_prompt=NUM_IMAGES).array
                np.testing.assert_array_equal(shown, want)
                np.testing.assert_array_equal(grid, preview_grid(want, 4, 128))

                def colour(image):
                    blobs = alignment.find_blobs(image)
                    return blobs[0].color if blobs else None

                assert [colour(x) for x in shown] == [colour(x) for x in want]

                # Inpainting from files, 2 images (the count of the API test: no new compile).
                size = pipe.image_size()
                scene = shapes.scene_from_caption(PROMPT, np.random.default_rng(0))
                image = shapes.render(scene, size)
                # Re-generate a corner away from the red circle: the circle must come back
                # through the page untouched, so the checker reads red in every edit.
                mask = np.zeros((size, size), np.uint8)
                mask[: size // 4, : size // 4] = 255
                assert not (shapes.object_mask(scene.objects[0], size) & (mask > 0)).any()
                Image.fromarray(image).save(tmp_path / "image.png")
                Image.fromarray(mask).save(tmp_path / "mask.png")
                edit_prompt = "a large blue circle in the center"
                page.fill("#prompt", edit_prompt)
                page.fill("#num_images", "2")
                page.set_input_files("#image", str(tmp_path / "image.png"))
                page.set_input_files("#mask", str(tmp_path / "mask.png"))
                page.click("#inpaint")
                page.wait_for_function(
                    "document.querySelectorAll('#links a').length === 2 || "
                    "document.getElementById('error').textContent",
                    timeout=180_000,
                )
                assert page.text_content("#error") == ""
                links = page.eval_on_selector_all("#links a", "els => els.map(a => a.href)")
                edits = pipe.inpaint(image, mask, edit_prompt, num_images=2, seed=11).array
                got = np.stack([decode(u) for u in links])
                np.testing.assert_array_equal(got, edits)
                assert colour(image) == "red" and [colour(x) for x in got] == ["red", "red"]

                for prompt, count, message in [
                    ("", "2", "Empty prompt: give a caption, e.g. 'a red circle'."),
                    (PROMPT, "99", "99 images requested; this server makes at most 16 per "
                     "request (--max_images)."),
                ]:  # fmt: skip
                    page.fill("#prompt", prompt)
                    page.fill("#num_images", count)
                    page.click("#generate")
                    page.wait_for_function("document.getElementById('error').textContent !== ''")
                    assert page.text_content("#error") == message
            finally:
                browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
