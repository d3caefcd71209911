"""The browser playground: request checks, the one-at-a-time queue, results against direct
generation, the HTTP API of a real server process, and the page driven in headless Chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from fourm.playground.jobs import JobQueue, QueueFull
from fourm.playground.requests import BadRequest, Limits, parse_boxes, parse_request
from fourm.playground.scenes import SceneStore

KNOWN = ["caption", "rgb", "depth", "semseg", "boxes"]


def png_bytes(w: int = 64, h: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def parse(fields: dict, upload: bytes | None = None, limits: Limits | None = None, **kw):
    scenes = SceneStore(num=5)
    return parse_request({"targets": "depth", **fields}, upload, known=KNOWN, res=64, limits=limits or Limits(), scene_rgb=scenes.rgb, num_scenes=5, **kw)


def bad(message_part: str, fields: dict, upload: bytes | None = None, limits: Limits | None = None, status: int = 400) -> None:
    with pytest.raises(BadRequest) as info:
        parse(fields, upload, limits)
    assert message_part in str(info.value), str(info.value)
    assert info.value.status == status
    assert "\n" not in str(info.value)


def test_request_checks():
    req = parse({"image_source": "upload", "targets": "caption,depth", "steps": "3", "temperature": "0.5", "cfg": "2", "seed": "7"}, png_bytes(96, 80))
    assert req.inputs["rgb"].shape == (1, 3, 64, 64) and req.inputs["rgb"].dtype == torch.uint8
    assert req.targets == ["caption", "depth"] and (req.config.steps, req.config.temperature, req.config.cfg_scale, req.config.seed) == (3, 0.5, 2.0, 7)
    assert req.notes and "96x80" in req.notes[0]
    req = parse({"image_source": "scene", "scene": "3", "use_caption": "1", "caption": " a red cube ", "mode": "independent"})
    assert req.scene_index == 3 and req.inputs["caption"] == ["a red cube"] and req.mode == "independent"
    assert torch.equal(req.inputs["rgb"][0], SceneStore(num=5).get(3)["rgb"])
    bad("not an image", {"image_source": "upload"}, b"this is text, not a picture")
    bad("damaged or truncated", {"image_source": "upload"}, png_bytes()[:200])
    bad("empty", {"image_source": "upload"}, b"")
    bad("no file chosen", {"image_source": "upload"})
    bad("limit is 1 MB", {"image_source": "upload"}, b"x" * (2**20 + 1), Limits(max_upload_bytes=2**20), status=413)
    bad("megapixels", {"image_source": "upload"}, png_bytes(), Limits(max_pixels=1000), status=413)
    bad("caption is empty", {"image_source": "none", "use_caption": "1", "caption": "   "})
    bad("no input", {"image_source": "none"})
    bad("no output chosen", {"image_source": "scene", "scene": "0", "targets": ""})
    bad("unknown target 'thermal'", {"image_source": "scene", "scene": "0", "targets": "thermal"})
    bad("rgb is both an input and a target", {"image_source": "scene", "scene": "0", "targets": "rgb"})
    bad("scene number must be between 0 and 4", {"image_source": "scene", "scene": "9"})
    bad("steps must be between 1 and 64", {"image_source": "scene", "scene": "0", "steps": "0"})
    bad("temperature must be a number", {"image_source": "scene", "scene": "0", "temperature": "hot"})
    bad("image_source must be one of", {"image_source": "webcam"})


def test_box_parsing():
    lim = Limits()
    assert parse_boxes("1 2 30 40 large red cube\n\n5,6,7,8 small blue sphere", 64, lim) == [
        {"bbox": [1.0, 2.0, 30.0, 40.0], "label": "large red cube"},
        {"bbox": [5.0, 6.0, 7.0, 8.0], "label": "small blue sphere"},
    ]
    assert parse_boxes('[{"bbox": [0, 0, 64, 64], "label": "ground"}]', 64, lim) == [{"bbox": [0.0, 0.0, 64.0, 64.0], "label": "ground"}]
    for text, part in (("1 2 3 cube", "line 1"), ("10 10 5 20 cube", "x0 < x1"), ("0 0 70 10 cube", "<= 64"), ("[{]", "not valid JSON"), ('[{"bbox": [1, 2]}]', "must be a list")):
        with pytest.raises(BadRequest, match=part.replace("(", r"\(")):
            parse_boxes(text, 64, lim)


def test_truth_metrics_hand_cases():
    from fourm.playground.runner import truth_metrics

    truth = {"boxes": [{"bbox": [0, 0, 10, 10], "label": "red cube"}, {"bbox": [20, 20, 30, 30], "label": "blue sphere"}], "scene": {"objects": []}}
    m = truth_metrics("boxes", [{"bbox": [0, 0, 10, 10], "label": "red cube"}, {"bbox": [20, 20, 30, 30], "label": "red cube"}], truth, 5)
    assert m == {"predicted": 2, "true": 2, "matched (same label)": 1, "mean IoU over true": 0.5}
    depth = torch.full((1, 4, 4), 2.0)
    m = truth_metrics("depth", torch.full((1, 4, 4), 3.0), {"depth": depth}, 5)
    assert m["AbsRel"] == pytest.approx(0.5) and m["δ1"] == 0.0
    seg = torch.zeros(4, 4, dtype=torch.long)
    seg[:, 2:] = 1
    m = truth_metrics("semseg", torch.ones(4, 4, dtype=torch.long), {"semseg": seg}, 5)
    assert m["pixel acc"] == 0.5 and m["mIoU"] == pytest.approx(0.25)  # class 0: IoU 0, class 1: 8/16


def test_queue_runs_one_at_a_time_in_order_and_survives_failures():
    spans: list[tuple[str, float, float]] = []
    gate = threading.Event()

    def handler(payload, progress):
        progress(f"working on {payload}")
        start = time.perf_counter()
        if payload == "a":
            gate.wait(10)
        time.sleep(0.05)
        if payload == "boom":
            raise RuntimeError("kaput")
        if payload == "bad":
            raise BadRequest("bad input")
        spans.append((payload, start, time.perf_counter()))
        return {"echo": payload}

    jobs = JobQueue(handler, max_waiting=3)
    ids = [jobs.submit("a")]
    while jobs.status(ids[0])["state"] != "running":
        time.sleep(0.01)
    assert jobs.status(ids[0])["stage"] == "working on a"
    ids += [jobs.submit(p) for p in ("boom", "bad", "b")]
    assert [jobs.status(i)["ahead"] for i in ids[1:]] == [1, 2, 3]
    with pytest.raises(QueueFull, match="queue is full"):
        jobs.submit("c")
    gate.set()
    deadline = time.time() + 10
    while time.time() < deadline and any(jobs.status(i)["state"] in ("queued", "running") for i in ids):
        time.sleep(0.02)
    states = [jobs.status(i) for i in ids]
    assert [s["state"] for s in states] == ["done", "error", "error", "done"]
    assert states[1]["error"] == "generation failed: RuntimeError: kaput"
    assert states[2]["error"] == "bad input"
    assert states[3]["result"] == {"echo": "b"}
    assert [p for p, _, _ in spans] == ["a", "b"]  # first in, first out
    assert spans[0][2] <= spans[1][1]  # never two at once
    assert jobs.status("job-999") is None


def test_run_request_matches_direct_generation(tiny_model_dir):
    from fourm.generation.api import GenerationConfig, generate
    from fourm.generation.files import open_model
    from fourm.playground.runner import run_request

    model, tok = open_model(tiny_model_dir)
    scenes = SceneStore(num=4, res=tok.resolution)
    req = parse_request({"image_source": "scene", "scene": "2", "targets": "caption,depth,semseg,boxes", "steps": "2", "seed": "5"}, None, known=tok.modalities, res=tok.resolution, limits=Limits(), scene_rgb=scenes.rgb, num_scenes=4)
    out = run_request(model, tok, req, model_dir=str(tiny_model_dir), truth=scenes.get(2))
    direct = generate(model, tok, req.inputs, req.targets, GenerationConfig(steps=2, seed=5))
    cards = {c["modality"]: c for c in out["outputs"]}
    assert list(cards) == ["caption", "depth", "semseg", "boxes"]
    assert cards["caption"]["text"] == direct.outputs["caption"][0]
    assert cards["caption"]["truth"]["text"] == scenes.get(2)["caption"]
    for m in ("depth", "semseg", "boxes"):
        assert cards[m]["image"].startswith("data:image/png;base64,") and cards[m]["truth"]["image"].startswith("data:image/png;base64,")
    d = direct.outputs["depth"][0]
    assert cards["depth"]["text"].startswith(f"{float(d.min()):.2f} to {float(d.max()):.2f} m")
    assert set(cards["depth"]["metrics"]) == {"AbsRel", "δ1"} and set(cards["semseg"]["metrics"]) == {"mIoU", "pixel acc"}
    assert 0 <= cards["semseg"]["metrics"]["mIoU"] <= 1 and cards["semseg"]["legend"]
    assert cards["boxes"]["metrics"]["predicted"] == len(direct.outputs["boxes"][0]) and cards["boxes"]["metrics"]["true"] == len(scenes.get(2)["boxes"])
    assert cards["boxes"]["metrics"]["matched (same label)"] <= min(cards["boxes"]["metrics"]["predicted"], cards["boxes"]["metrics"]["true"])
    assert "--from rgb=scene-00002.png" in out["commands"][0] and "--to caption,depth,semseg,boxes" in out["commands"][0] and "--seed 5" in out["commands"][0]
    req.mode = "independent"
    out = run_request(model, tok, req, model_dir=str(tiny_model_dir))
    alone = generate(model, tok, req.inputs, ["semseg"], GenerationConfig(steps=2, seed=5))
    assert len(out["commands"]) == 4 and "truth" not in out["outputs"][0]
    from fourm.playground.runner import picture

    assert out["outputs"][2]["image"] == picture("semseg", alone.outputs["semseg"][0], req.inputs["rgb"][0].permute(1, 2, 0).numpy(), tok.resolution)["image"]


def test_program_usage_errors(tiny_model_dir, tmp_path):
    import socket

    from conftest import assert_usage_error, run_program

    assert_usage_error(run_program("launch/playground.py", "--model", str(tmp_path / "none")), "make demo")
    assert_usage_error(run_program("launch/playground.py", "--model", str(tmp_path)), "config.json")
    assert_usage_error(run_program("launch/playground.py", "--model", str(tiny_model_dir), "--port", "70000"), "--port")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert_usage_error(run_program("launch/playground.py", "--model", str(tiny_model_dir), "--port", str(port)), f"cannot listen on 127.0.0.1:{port}")


# -- a real server process -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("playground") / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(REPO / "launch/playground.py"), "--model", str(tiny_model_dir), "--port", "0", "--scenes", "20", "--max-upload-mb", "1"], stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(120)
    if not line or "http://" not in line[0]:
        proc.kill()
        pytest.fail(f"the playground did not start: {line} {log.read_text()[-2000:]}")
    url = line[0].split()[1]
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def http(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict | bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            body, status, kind = r.read(), r.status, r.headers.get("content-type", "")
    except urllib.error.HTTPError as exn:
        body, status, kind = exn.read(), exn.code, exn.headers.get("content-type", "")
    return status, json.loads(body) if "json" in kind else body


def multipart(fields: dict, files: dict | None = None) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (name, data) in (files or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def wait_job(url: str, job_id: str) -> dict:
    deadline = time.time() + 120
    while time.time() < deadline:
        status, body = http(f"{url}api/jobs/{job_id}")
        assert status == 200, body
        if body["state"] in ("done", "error"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"{job_id} did not finish")


def test_server_api(server):
    status, info = http(server + "api/info")
    assert status == 200 and info["arch"] == "encdec" and "depth" in info["modalities"] and info["scenes"] == 20
    status, png = http(server + "api/scenes/3.png")
    assert status == 200 and Image.open(io.BytesIO(png)).size == (64, 64)
    assert http(server + "api/scenes/20.png")[0] == 404
    status, body = http(server + "api/scenes/abc.png")
    assert status == 400 and body["error"].startswith("bad request")
    assert "caption" in http(server + "api/scenes/3")[1]
    # bad requests: one sentence each, and the server carries on
    status, body = http(server + "api/jobs", *multipart({"image_source": "upload", "targets": "depth"}, {"image": ("x.png", b"not an image")}))
    assert status == 400 and "not an image" in body["error"]
    status, body = http(server + "api/jobs", *multipart({"image_source": "upload", "targets": "depth"}, {"image": ("big.png", b"\0" * (3 * 2**20))}))
    assert status == 413 and "limit is 1 MB" in body["error"]
    status, body = http(server + "api/jobs", *multipart({"image_source": "none", "use_caption": "1", "caption": "", "targets": "rgb"}))
    assert status == 400 and "caption is empty" in body["error"]
    assert http(server + "api/jobs/job-12345")[0] == 404
    assert http(server + "api/nothing")[0] == 404
    # three requests at once: queued, run one after another, all complete
    ids = []
    for seed in range(3):
        status, body = http(server + "api/jobs", *multipart({"image_source": "scene", "scene": str(seed), "targets": "depth,caption", "steps": "2", "seed": str(seed)}))
        assert status == 200, body
        ids.append(body["id"])
    done = [wait_job(server, i) for i in ids]
    assert [d["state"] for d in done] == ["done"] * 3, done
    for a, b in zip(done, done[1:]):
        assert a["finished"] <= b["started"]
    assert done[0]["result"]["outputs"][0]["metrics"]["δ1"] >= 0


def test_latency_program(server, tmp_path):
    from conftest import assert_usage_error, run_program

    proc = run_program("eval/playground_latency.py", "--url", server, "--repeats", "2", "--steps", "2", "--json", str(tmp_path / "lat.json"))
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "lat.json").read_text())
    assert len(r["requests"]) == 2 and all(v["generation_s"] > 0 and v["submit_to_result_s"] >= v["generation_s"] for v in r["requests"].values())
    assert_usage_error(run_program("eval/playground_latency.py", "--url", "http://127.0.0.1:1/"), "no playground answers")


# -- the page in a real browser ----------------------------------------------------------------------
def chromium_path() -> str | None:
    for candidate in (os.environ.get("FOURM_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make install puts it in the dev extras)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium on this machine: `sudo apt-get install chromium` (make install does it where it runs as root), or set FOURM_CHROMIUM")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(90_000)
        pg.goto(server)
        pg.wait_for_function("document.getElementById('model-info').textContent.startsWith('model ')")
        yield pg
        browser.close()


def _image_ok(page, selector: str) -> bool:
    """The image loaded and decoded (waits up to 10 s for it to finish loading)."""
    try:
        page.wait_for_function("sel => document.querySelector(sel) && document.querySelector(sel).complete", arg=selector, timeout=10_000)
    except Exception:
        return False
    return page.eval_on_selector(selector, "img => img.naturalWidth > 0 && img.naturalHeight > 0")


def _generate(page) -> None:
    page.evaluate("document.getElementById('results').textContent = ''; document.getElementById('status').textContent = ''")
    page.click("#generate")


def test_page_in_a_browser(page, synth_dir, tmp_path):
    import tarfile

    with tarfile.open(synth_dir / "shard-000000.tar") as tar:
        (tmp_path / "scene.png").write_bytes(tar.extractfile("00000000.rgb.png").read())
    (tmp_path / "notes.png").write_text("this is not an image")
    page.screenshot(path=str(tmp_path / "0-start.png"), full_page=True)
    assert _image_ok(page, "#scene-thumb")

    # upload an image, ask for depth and caption
    page.check("#source-upload")
    page.set_input_files("#upload", str(tmp_path / "scene.png"))
    page.uncheck("#target-semseg")
    page.uncheck("#target-boxes")
    page.fill("#steps", "2")
    _generate(page)
    page.wait_for_selector(".result[data-modality=caption] .output-text")
    assert _image_ok(page, ".result[data-modality=depth] img.output")
    assert _image_ok(page, ".card.input[data-modality=rgb] img.input-image")
    caption = page.text_content(".result[data-modality=caption] .output-text").strip()
    assert caption and caption != "(empty)"
    assert page.locator(".result").count() == 2
    assert "--to depth,caption" in page.text_content("#command")
    assert page.get_attribute(".result[data-modality=depth] a.download", "download") == "depth.png"
    page.screenshot(path=str(tmp_path / "1-depth-caption.png"), full_page=True)

    # a bad upload shows the error in the page; a good request after it still succeeds
    page.set_input_files("#upload", str(tmp_path / "notes.png"))
    _generate(page)
    page.wait_for_selector("#error.shown")
    assert "not an image" in page.text_content("#error")
    page.screenshot(path=str(tmp_path / "2-bad-upload.png"), full_page=True)
    page.set_input_files("#upload", str(tmp_path / "scene.png"))
    _generate(page)
    page.wait_for_selector(".result[data-modality=caption] .output-text")
    assert not page.is_visible("#error") and _image_ok(page, ".result[data-modality=depth] img.output")

    # an empty caption is reported in the page
    page.check("#source-none")
    page.check("#use-caption")
    page.fill("#caption", "  ")
    _generate(page)
    page.wait_for_selector("#error.shown")
    assert "caption is empty" in page.text_content("#error")

    # chained mode from a caption: semseg -> depth -> rgb, each output a picture
    page.click("#preset-chain")
    _generate(page)
    page.wait_for_selector(".result[data-modality=rgb] img.output")
    assert [page.get_attribute(el, "data-modality") for el in ["#output-cards .result:nth-child(1)", "#output-cards .result:nth-child(2)", "#output-cards .result:nth-child(3)"]] == ["semseg", "depth", "rgb"]
    for m in ("semseg", "depth", "rgb"):
        assert _image_ok(page, f".result[data-modality={m}] img.output"), m
    page.screenshot(path=str(tmp_path / "3-chain.png"), full_page=True)

    # a held-out scene: predictions beside ground truth, with this scene's metrics
    page.check("#source-scene")
    page.uncheck("#use-caption")
    page.fill("#scene", "4")
    page.uncheck("#target-rgb")
    _generate(page)
    page.wait_for_selector(".result[data-modality=depth] img.truth")
    assert _image_ok(page, ".result[data-modality=depth] img.truth")
    assert "AbsRel" in page.text_content(".result[data-modality=depth] table.metrics")
    page.screenshot(path=str(tmp_path / "4-scene-truth.png"), full_page=True)


def test_boxes_are_drawn_whatever_label_a_model_generates():
    import numpy as np

    from fourm.viz import draw_boxes

    rgb = np.zeros((8, 8, 3), np.uint8)
    out = draw_boxes(rgb, [{"bbox": [1, 1, 6, 6], "label": "large red cube"}, {"bbox": [6, 6, 2, 2], "label": " "}, {"bbox": [0, 0, 3, 3], "label": ""}], scale=4)
    assert out.shape == (32, 32, 3) and out.any()
