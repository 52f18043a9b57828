r"""Binary: a local web page for text-to-image generation and inpainting with an exported model.

    python -m muse_jax.serve --model=models/shapes            # or: muse-serve --model=...
    # then open http://127.0.0.1:8000

The page (`GET /`) has a prompt, a negative prompt, the guidance scale, the number of steps, the
seed and the number of images; Generate shows the images as one grid (enlarged, nearest
neighbour). Inpainting takes an image and a mask (white = re-generate) from files and re-generates
the masked pixels under the same prompt and settings. A bad input (an empty or over-long prompt, a
number out of range, too many images) is shown as one line under the buttons.

The page talks JSON to two endpoints, which scripts may call too:

    POST /api/generate {prompt, negative_prompt, guidance_scale, num_steps, seed, num_images}
    POST /api/inpaint  {... the same, image: "data:image/png;base64,...", mask: data URL}
      -> 200 {grid: PNG data URL, images: [PNG data URL of each image, native size], seconds}
      -> 400 {error: "one line"} for bad input; 500 {error: "one line"} for anything else.

`null` (or a missing key) keeps the model's default for guidance_scale and num_steps, seed 0, and
4 images (at most `--max_images`); an empty negative prompt keeps the model's (the config's
`sampling.negative_prompt`). The same request gives the same images as
`MusePipeline(...)(prompt, seed=..., num_images_per_prompt=...)` with the same settings.

Binding: 127.0.0.1 (this machine only) by default. There is no authentication: `--host=0.0.0.0`
exposes the model to the network, only do that on a trusted one.

Queueing: the model runs on one device, so requests never run concurrently. Each one is handed to a
single-worker executor and waits there, in arrival order, while the server keeps answering (the
page, other requests joining the queue). `seconds` is the time the request spent computing, not
waiting. A new number of images or of steps compiles once (seconds on CPU), then is cached.
"""

import asyncio
import base64
import binascii
import concurrent.futures
import io
import json
import logging
import math
import time
from typing import Any

from absl import flags

from muse_jax import cli
from muse_jax.errors import UsageError

_MODEL = flags.DEFINE_string("model", None, "Exported model directory (muse_jax.export).")
_HOST = flags.DEFINE_string(
    "host", "127.0.0.1", "Address to bind; the default serves this machine only."
)
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 16, "Most images one request may ask for.")

MAX_STEPS = 256
MAX_GUIDANCE = 100.0
MAX_SEED = 2**32 - 1  # jax.random.PRNGKey reads a seed as 32 bits.
MAX_UPLOAD_PIXELS = 4096 * 4096
DEFAULT_IMAGES = 4
GRID_COLUMNS = 4

_log = logging.getLogger("muse_jax.serve")


class BadRequest(ValueError):
    """A client mistake: answered 400 with its one-line message."""


def one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


# ----------------------------------------------------------------------------- request parsing


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _number(body: dict, key: str, kind: type, low: float, high: float, default):
    value = body.get(key)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise BadRequest(f"{key} must be a number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{key} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise BadRequest(f"{key} must be a finite number, got {value!r}.")
    if kind is int:
        if number != int(number):
            raise BadRequest(f"{key} must be a whole number, got {value!r}.")
        number = int(number)
    if not low <= number <= high:
        bounds = (
            f"between {_fmt(low)} and {_fmt(high)}" if math.isfinite(high) else f">= {_fmt(low)}"
        )
        raise BadRequest(f"{key} must be {bounds}, got {value!r}.")
    return number


def _text(body: dict, key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string, got {type(value).__name__}.")
    return value


def parse_settings(body: Any, max_images: int) -> dict[str, Any]:
    """The pipeline's keyword arguments from a request body; BadRequest for a bad field."""
    from muse_jax.inference.pipeline import MAX_PROMPT_CHARS, check_prompt

    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    prompt = _text(body, "prompt") or ""
    check_prompt(prompt)  # Empty or over-long: the pipeline's own message.
    negative = _text(body, "negative_prompt")
    if negative is not None and len(negative) > MAX_PROMPT_CHARS:
        raise BadRequest(
            f"The negative prompt has {len(negative)} characters; at most {MAX_PROMPT_CHARS} "
            "are accepted."
        )
    num_images = _number(body, "num_images", int, 1, math.inf, min(DEFAULT_IMAGES, max_images))
    if num_images > max_images:
        raise BadRequest(
            f"{num_images} images requested; this server makes at most {max_images} per request "
            "(--max_images)."
        )
    return {
        "prompt": prompt,
        "negative_prompt": negative if negative and negative.strip() else None,
        "guidance_scale": _number(body, "guidance_scale", float, 0, MAX_GUIDANCE, None),
        "num_steps": _number(body, "num_steps", int, 1, MAX_STEPS, None),
        "seed": _number(body, "seed", int, 0, MAX_SEED, 0),
        "num_images": num_images,
    }


def decode_image(data_url: Any, key: str):
    """A PIL image from a `data:image/...;base64,` URL (or bare base64); BadRequest otherwise."""
    from PIL import Image

    if not isinstance(data_url, str) or not data_url:
        raise BadRequest(
            f"{key} is missing: give an image as a data URL (data:image/png;base64,...)."
        )
    payload = data_url.split(",", 1)[1] if data_url.startswith("data:") else data_url
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{key} is not valid base64 data.") from None
    try:
        im = Image.open(io.BytesIO(raw))
        if im.width * im.height > MAX_UPLOAD_PIXELS:
            raise BadRequest(
                f"{key} is {im.width}x{im.height}; at most {MAX_UPLOAD_PIXELS} pixels are accepted."
            )
        im.load()
    except BadRequest:
        raise
    except Exception:
        raise BadRequest(f"{key} is not an image that PIL can read (PNG, JPEG, ...).") from None
    return im


def png_data_url(array) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def grid_image(array):
    """The page's grid: up to GRID_COLUMNS a row, each image enlarged to >= 128 pixels."""
    from muse_jax.inference.images import preview_grid

    return preview_grid(array, columns=GRID_COLUMNS, min_side=128)


def _response(array, seconds: float) -> dict[str, Any]:
    return {
        "grid": png_data_url(grid_image(array)),
        "images": [png_data_url(a) for a in array],
        "seconds": round(seconds, 3),
    }


# ----------------------------------------------------------------------------- the app


def page_html(pipe, max_images: int) -> str:
    from muse_jax.serve_page import PAGE

    sampling = pipe.config.base.sampling
    defaults = {
        "guidance_scale": float(sampling.get("guidance_scale", 3.0)),
        "num_steps": int(sampling.get("num_steps", 12)),
        "num_images": min(DEFAULT_IMAGES, max_images),
        "max_images": max_images,
        "image_size": int(pipe.image_size()),
    }
    return PAGE.replace("__DEFAULTS__", json.dumps(defaults).replace("</", "<\\/"))


def create_app(pipe, max_images: int = 16):
    """The FastAPI app serving `pipe` (a `MusePipeline`): the page and the JSON endpoints.

    Pipeline calls run one at a time on a single-worker executor (see the module docstring).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    if max_images < 1:
        raise UsageError(f"max_images must be >= 1, got {max_images}.")
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="muse")
    page = page_html(pipe, max_images)
    app = FastAPI(title="muse_jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pipe = pipe
    app.state.executor = executor
    app.state.max_images = max_images

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def run(call):
        """Queues `call` on the one worker; (status, JSON body)."""

        def timed():
            start = time.perf_counter()
            array = call()
            return _response(array, time.perf_counter() - start)

        try:
            return JSONResponse(await asyncio.get_running_loop().run_in_executor(executor, timed))
        except ValueError as e:  # BadRequest, or the pipeline refusing an input.
            return error(400, one_line(e))
        except Exception as e:
            _log.exception("request failed")
            return error(500, f"{type(e).__name__}: {one_line(e)}")

    async def read_body(request: Request):
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("The request body is not valid JSON.") from None

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.post("/api/generate")
    async def generate(request: Request):
        try:
            s = parse_settings(await read_body(request), max_images)
        except ValueError as e:
            return error(400, one_line(e))

        def call():
            return pipe(
                [s["prompt"]],
                negative_prompt=s["negative_prompt"],
                guidance_scale=s["guidance_scale"],
                num_steps=s["num_steps"],
                seed=s["seed"],
                num_images_per_prompt=s["num_images"],
            ).array

        return await run(call)

    @app.post("/api/inpaint")
    async def inpaint(request: Request):
        try:
            body = await read_body(request)
            s = parse_settings(body, max_images)
            image = decode_image(body.get("image"), "image")
            mask = decode_image(body.get("mask"), "mask")
        except ValueError as e:
            return error(400, one_line(e))

        def call():
            return pipe.inpaint(
                image,
                mask,
                s["prompt"],
                num_images=s["num_images"],
                negative_prompt=s["negative_prompt"],
                guidance_scale=s["guidance_scale"],
                num_steps=s["num_steps"],
                seed=s["seed"],
            ).array

        return await run(call)

    return app


def main(argv):
    cli.check_no_extra_args(argv)
    cli.require_positive("max_images", _MAX_IMAGES.value)
    if not 0 <= _PORT.value <= 65535:
        raise cli.UsageError(f"--port must be between 0 and 65535, got {_PORT.value}.")
    cli.check_reachable(_MODEL.value)
    import uvicorn

    from muse_jax.inference import MusePipeline

    pipe = MusePipeline.from_pretrained(
        _MODEL.value, batch_size=min(16, _MAX_IMAGES.value), max_images=_MAX_IMAGES.value
    )
    app = create_app(pipe, max_images=_MAX_IMAGES.value)
    host = _HOST.value
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: serving on {host} without authentication: anyone who can reach it can use it"
        )
    size = pipe.image_size()
    print(
        f"serving {_MODEL.value} ({size}x{size}, checkpoint steps {pipe.steps}) on "
        f"http://{host}:{_PORT.value}  (Ctrl-C stops)",
        flush=True,
    )
    uvicorn.run(app, host=host, port=_PORT.value, log_level="warning")
    return 0


def run():
    flags.mark_flags_as_required(["model"])
    cli.run(main)


if __name__ == "__main__":
    run()
