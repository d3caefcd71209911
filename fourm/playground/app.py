"""The playground's web app (FastAPI): one page and a small JSON API.

    GET  /                     the page (``page.html``: no external scripts, works offline)
    GET  /api/info             the model's modalities, resolution, defaults, limits, scene count
    GET  /api/scenes/{i}.png   held-out scene i's image; /api/scenes/{i} its caption and boxes
    POST /api/jobs             a request (multipart form, see ``requests.parse_request``) -> {"id"}
    GET  /api/jobs/{id}        its state: queued (with how many are ahead), running (stage), done
                               (result) or error (one sentence)

Requests run one at a time on a worker thread (``jobs.JobQueue``); every error is JSON
``{"error": "..."}`` with a 4xx status, and the server keeps serving after any request.
"""

from __future__ import annotations

import logging
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fourm.generation.api import GenerationConfig
from fourm.playground.jobs import JobQueue, QueueFull
from fourm.playground.requests import BadRequest, Limits, PlaygroundRequest, parse_request
from fourm.playground.runner import boxes_text, run_request
from fourm.playground.scenes import SceneStore

log = logging.getLogger(__name__)

DRAIN_LIMIT = 256 * 2**20  # larger requests are refused without reading them
CHAIN_PRESET = {"caption": "a large red sphere left of a small blue cube on the ground", "targets": ["semseg", "depth", "rgb"]}


def create_app(model, tokenizers, *, model_dir: str = "MODEL", scenes: SceneStore | None = None, limits: Limits | None = None, max_waiting: int = 16):
    """The FastAPI app serving ``model`` with its ``TokenizerSet``."""
    limits = limits or Limits()
    scenes = scenes if scenes is not None else SceneStore(res=tokenizers.resolution)
    known = tokenizers.modalities
    page = resources.files("fourm.playground").joinpath("page.html").read_text(encoding="utf-8")

    def handle(req: PlaygroundRequest, progress) -> dict:
        truth = scenes.get(req.scene_index) if req.scene_index is not None else None
        return run_request(model, tokenizers, req, model_dir=model_dir, truth=truth, progress=progress)

    jobs = JobQueue(handle, max_waiting=max_waiting)
    app = FastAPI(title="fourm playground", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.jobs = jobs

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exn):  # 404/405 as JSON with one sentence
        return error(exn.status_code, str(exn.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exn):  # e.g. /api/scenes/abc.png
        where = ", ".join(str(e.get("loc", ["?"])[-1]) + ": " + str(e.get("msg", "invalid")) for e in exn.errors()[:3])
        return error(400, f"bad request ({where})")

    @app.exception_handler(Exception)
    async def unexpected(request, exn):
        log.exception("unexpected error on %s", request.url.path)
        return error(500, f"server error: {type(exn).__name__}: {exn}")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/api/info")
    async def info():
        d = GenerationConfig()
        return {
            "model": model_dir,
            "arch": model.config.arch,
            "modalities": known,
            "image_modalities": [m for m in known if m in tokenizers.images],
            "resolution": tokenizers.resolution,
            "scenes": scenes.num,
            "scene_seed": scenes.seed,
            "max_upload_mb": limits.max_upload_bytes / 2**20,
            "max_steps": limits.max_steps,
            "defaults": {"steps": d.steps, "temperature": d.temperature, "cfg": d.cfg_scale, "seed": d.seed, "top_k": d.top_k, "top_p": d.top_p},
            "chain_preset": {**CHAIN_PRESET, "targets": [t for t in CHAIN_PRESET["targets"] if t in known]},
        }

    def scene_or_404(index: int) -> dict:
        if not 0 <= index < scenes.num:
            raise StarletteHTTPException(404, f"no held-out scene {index}: scenes are 0..{scenes.num - 1}")
        return scenes.get(index)

    @app.get("/api/scenes/{index}.png")
    async def scene_png(index: int):
        return Response(scene_or_404(index)["rgb_png"], media_type="image/png")

    @app.get("/api/scenes/{index}")
    async def scene_info(index: int):
        s = scene_or_404(index)
        return {"index": index, "caption": s["caption"], "boxes": boxes_text(s["boxes"])}

    @app.post("/api/jobs")
    async def submit(request: Request):
        size = int(request.headers.get("content-length") or 0)
        if size > limits.max_upload_bytes + 2**20:
            if size <= DRAIN_LIMIT:  # read it away so the browser sees the answer, not a broken pipe
                async for _ in request.stream():
                    pass
            return error(413, f"the file is {size / 2**20:.1f} MB; the limit is {limits.max_upload_bytes / 2**20:.0f} MB")
        try:
            form = await request.form(max_files=1, max_fields=32)
        except Exception as exn:
            return error(400, f"could not read the form: {exn}")
        upload, fields = None, {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                if key == "image" and getattr(value, "filename", ""):
                    upload = await value.read(limits.max_upload_bytes + 1)
            else:
                fields[key] = value
        try:
            req = await run_in_threadpool(parse_request, fields, upload, known=known, res=tokenizers.resolution, limits=limits, scene_rgb=scenes.rgb, num_scenes=scenes.num)
            job_id = jobs.submit(req)
        except BadRequest as exn:
            return error(exn.status, str(exn))
        except QueueFull as exn:
            return error(429, str(exn))
        return {"id": job_id, **jobs.status(job_id)}

    @app.get("/api/jobs/{job_id}")
    async def job(job_id: str):
        status = jobs.status(job_id)
        if status is None:
            return error(404, f"no job {job_id} (finished jobs are kept for a while, then forgotten)")
        return status

    return app
