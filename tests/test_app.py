"""The web page (``python -m vpd_jax.app``): its work without a browser, then the real page in headless Chromium.

The browser test starts the app in a subprocess on a free localhost port with a micro checkpoint (random weights,
crop 64: one compile of a few seconds), uploads a synthetic room, waits for the depth picture and the 3-D view,
downloads the 16-bit PNG and compares it with ``Predictor.predict`` on the same image in this process, saves a
screenshot under the test's tmp_path, pastes a picture through the browser's clipboard (permission granted through
CDP) and checks its depth the same way and that one over --max_pixels is refused, then sends files the app must
refuse (a text file named .jpg, a truncated JPEG, an image over --max_pixels, a file over --max_upload_mb) and
checks that each shows its message on the page and that the app still serves the next picture. It skips, saying why,
without chromium + chromedriver (Debian packages ``chromium chromium-driver``) or without selenium and gradio
(requirements-app.txt).
"""

from __future__ import annotations

import importlib.util
import io
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from vpd_jax import visualize as vis
from vpd_jax.app import UNKNOWN_SCENE, DepthService, main
from vpd_jax.data import synthetic
from vpd_jax.errors import UserError
from vpd_jax.inference import Predictor, load_image
from vpd_jax.weights.testing import save_micro_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
CROP = 64
MAX_PIXELS = 300_000
# The app runs with the settings of PREDICTOR_KW, so its depth must equal this process's Predictor's.
PREDICTOR_KW = dict(crop=CROP, stride=CROP, batch_size=8)
APP_FLAGS = ["--crop", str(CROP), "--stride", str(CROP), "--batch_size", "8", "--max_pixels", str(MAX_PIXELS),
             "--max_upload_mb", "2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_micro_checkpoint(tmp_path_factory.mktemp("app_ckpt") / "micro")


@pytest.fixture(scope="module")
def predictor(ckpt):
    return Predictor.from_checkpoint(ckpt, **PREDICTOR_KW)


def room(path: pathlib.Path, h: int, w: int, index: int = 0) -> pathlib.Path:
    """A synthetic room as a lossless PNG (so the app reads exactly the pixels this process reads)."""
    Image.fromarray(synthetic.generate_scene(11, index, 0, h, w, split="test").image).save(path)
    return path


def bad_files(folder: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
    """name -> (file, a part of the message the app must show for it)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "notes.jpg"
    text.write_text("this is a text file, not a picture\n" * 20)
    full = folder / "full.jpg"
    Image.fromarray(synthetic.generate_scene(11, 3, 0, 96, 128, split="test").image).save(full, quality=95)
    cut = folder / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    big = folder / "big.png"  # 800x600 = 480,000 pixels > MAX_PIXELS, yet a small file
    Image.new("RGB", (800, 600), (90, 120, 150)).save(big)
    return {"text": (text, "notes.jpg: not a readable image"), "truncated": (cut, "cut.jpg: not a readable image"),
            "big": (big, f"larger than this app's limit of {MAX_PIXELS:,}")}


# ------------------------------------------------------------------------------------------- without a browser


def test_glb_holds_the_ply_points(tmp_path):
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 5.0, (30, 40)).astype(np.float32)
    depth[3, 4] = 0  # invalid: no point
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    n = vis.write_glb_points(tmp_path / "a.glb", depth, None, image)
    pts, ok = vis.depth_to_points(depth)
    pos, rgba = vis.read_glb_points(tmp_path / "a.glb")
    assert n == len(pts) == 30 * 40 - 1
    np.testing.assert_array_equal(pos, pts * np.array([1, -1, -1], np.float32))  # glTF: y up, looking down -z
    np.testing.assert_array_equal(rgba[:, :3], image[ok])
    assert (rgba[:, 3] == 255).all()
    vis.write_ply(tmp_path / "a.ply", depth, None, image)  # the download: the same points, camera frame
    ply = vis.read_ply(tmp_path / "a.ply")
    np.testing.assert_array_equal(np.stack([ply["x"], -ply["y"], -ply["z"]], -1), pos)
    m = vis.write_glb_points(tmp_path / "b.glb", depth, None, image, max_points=300)
    assert 0 < m <= 300 and len(vis.read_glb_points(tmp_path / "b.glb")[0]) == m


def test_service_answers_and_refuses(tmp_path, predictor):
    service = DepthService(predictor, tmp_path / "work", max_pixels=MAX_PIXELS, max_points=500)
    path = room(tmp_path / "r.png", 96, 128)
    r = service.run(path, UNKNOWN_SCENE)
    expected = predictor.predict(load_image(path))
    np.testing.assert_array_equal(r.depth, expected)
    png, npy, ply = r.files
    np.testing.assert_array_equal(np.asarray(Image.open(png)), vis.depth_to_png16(expected))
    np.testing.assert_array_equal(np.load(npy), expected)
    assert len(vis.read_ply(ply)) == 96 * 128 and 0 < len(vis.read_glb_points(r.glb)[0]) <= 500
    assert r.color.shape[0] == 96 and r.color.shape[1] > 128  # the colour bar on the right
    assert all(tmp_path / "work" in f.parents for f in [*r.files, r.glb])
    # Another scene changes the conditioning, not the compiled function.
    kitchen = service.run(path, "kitchen")
    assert str(kitchen.scene) == "scene class kitchen (6)" and not np.array_equal(kitchen.depth, r.depth)
    for name, (f, message) in bad_files(tmp_path / "bad").items():
        with pytest.raises(UserError, match=message.replace("(", r"\(")) as e:
            service.run(f)
        assert str(f.parent) not in str(e.value)  # the page names the upload, not where the server keeps it
    with pytest.raises(UserError, match="--clip"):
        service.run(path, prompt="a photo of a garage")


def test_free_text_scene_goes_through_the_text_encoder(tmp_path, predictor):
    class Encoder:  # stands in for TextEncoder (CLIP weights are not available offline)
        calls = []

        def embed(self, prompts):
            self.calls.append(list(prompts))
            return np.full((len(prompts), predictor.config.text_dim), 0.25, np.float32)

    service = DepthService(predictor, tmp_path / "work", text_encoder=Encoder())
    p = service.conditioned(UNKNOWN_SCENE, "  a photo of a garage ")
    assert str(p.scene) == "prompt 'a photo of a garage'" and (p.embedding == 0.25).all()
    assert p._forward is predictor._forward and predictor.scene.kind == "mean"  # shared, and the original unchanged
    service.conditioned(None, "a photo of a garage")
    assert Encoder.calls == [["a photo of a garage"]]  # embedded once
    assert service.conditioned("kitchen", "   ").scene.kind == "class"  # a blank box: the class


@pytest.mark.parametrize("argv, code, message", [
    (["--port", "70000"], 2, "--port 70000: expected 1..65535"),
    (["--max_pixels", "0"], 2, "--max_pixels 0: expected a positive number"),
    (["--nope"], 2, "unrecognized arguments: --nope"),
    (["--cmap", "no_such_map"], 2, "unknown colormap"),
    (["--checkpoint", "/nonexistent/ckpt"], 1, "--checkpoint /nonexistent/ckpt: no such file or folder"),
])
def test_command_line_mistakes(argv, code, message, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own mistakes exit from the parser
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_port_in_use_is_one_line_before_the_model_loads(ckpt, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        t0 = time.perf_counter()
        assert main(["--checkpoint", str(ckpt), "--port", str(s.getsockname()[1])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot listen there" in err[0] and "choose another --port" in err[0], err
    assert time.perf_counter() - t0 < 5  # nothing was loaded or compiled


def test_no_checkpoint_and_no_demo_model_says_run_make_demo(tmp_path, monkeypatch, capsys):
    import vpd_jax.app as app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(app, "ROOT", tmp_path)  # a checkout where `make demo` never ran
    assert main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run `make demo` first" in err[0], err


# ------------------------------------------------------------------------------------------- in a browser


def _browser_or_skip():
    missing = [m for m in ("selenium", "gradio") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (pip install -r requirements-app.txt)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("chromium and chromedriver not installed (Debian: apt-get install chromium chromium-driver)")
    return browser, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_server(ckpt, tmp_path_factory):
    _browser_or_skip()
    port = _free_port()
    tmp = tmp_path_factory.mktemp("app_tmp")
    cwd = tmp_path_factory.mktemp("app_cwd")  # elsewhere: Gradio serves files under the working folder freely
    log = tmp_path_factory.mktemp("app_log") / "app.log"
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               VPD_COMPILATION_CACHE=str(ROOT / ".jax_cache"), JAX_DEFAULT_MATMUL_PRECISION="highest",
               GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vpd_jax.app", "--checkpoint", str(ckpt), "--port", str(port),
                                 *APP_FLAGS], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 150
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the app did not answer at {url}:\n{log.read_text()}")
        time.sleep(0.5)
    yield url, proc, log, tmp
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = _browser_or_skip()
    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager: no network calls
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100",
              "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-gpu"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(what: str, fn, timeout: float = 60.0, driver=None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
        except Exception:  # noqa: BLE001 - elements come and go while the page updates
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            page = driver.find_element("tag name", "body").text if driver is not None else ""
            pytest.fail(f"timed out waiting for {what}; the page says:\n{page}")
        time.sleep(0.25)


def _upload(driver, path: pathlib.Path):
    """Put ``path`` into the upload box (clearing the previous file first, which hides the file input)."""
    from selenium.webdriver.common.by import By

    if not driver.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"):
        for b in driver.find_elements(By.CSS_SELECTOR, "#upload button[aria-label='Clear']"):
            driver.execute_script("arguments[0].click();", b)  # a refused upload's notice may cover it
    field = _wait("the upload field", lambda: driver.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"),
                  driver=driver)[0]
    field.send_keys(str(path))


def _paste(driver, url: str, png: bytes):
    """Put ``png`` on the browser's clipboard (Clipboard API, permission granted through CDP) and click the paste
    box, whose button reads the clipboard (clearing the previous picture first)."""
    import base64

    from selenium.webdriver.common.by import By

    driver.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": url.rstrip("/"), "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    written = driver.execute_async_script(
        "const [data, done] = arguments;"
        "fetch(data).then(r => r.blob()).then(b => navigator.clipboard.write([new ClipboardItem({'image/png': b})]))"
        ".then(() => done('ok'), e => done(String(e)));", "data:image/png;base64," + base64.b64encode(png).decode())
    assert written == "ok", written
    if not driver.find_elements(By.CSS_SELECTOR, "#paste .upload-container button"):
        for b in driver.find_elements(By.CSS_SELECTOR, "#paste button[aria-label='Clear']"):
            driver.execute_script("arguments[0].click();", b)
    button = _wait("the paste button", lambda: driver.find_elements(By.CSS_SELECTOR, "#paste .upload-container button"),
                   driver=driver)[0]
    driver.execute_script("arguments[0].click();", button)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def _download(url: str, path: pathlib.Path) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=30) as r:
        path.write_bytes(r.read())
    with Image.open(path) as im:
        return np.asarray(im)


def test_page_in_a_browser(app_server, browser, predictor, tmp_path):
    from selenium.webdriver.common.by import By

    url, proc, log, app_tmp = app_server
    d = browser
    body = lambda: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
    d.get(url)
    _wait("the page", lambda: "VPD depth estimation" in body() and "room1_" in body(), driver=d)

    # A good picture: depth picture, 3-D view, downloads, timing.
    good = room(tmp_path / "living.png", 96, 128)
    _upload(d, good)
    timing = _wait("the timing line", lambda: "for 128x96 pixels" in (t := d.find_element(By.ID, "timing").text)
                   and t, driver=d)
    assert "Depth in" in timing and "unknown scene" in timing
    _wait("the depth picture", lambda: d.find_elements(By.CSS_SELECTOR, "#depth_image img"), driver=d)
    _wait("the slider between input and depth", lambda: len(d.find_elements(By.CSS_SELECTOR, "#slider img")) == 2,
          driver=d)
    _wait("the 3-D view", lambda: d.find_elements(By.CSS_SELECTOR, "#cloud canvas"), driver=d)
    links = _wait("three downloads", lambda: (a := d.find_elements(By.CSS_SELECTOR, "#downloads a[href]"))
                  and len(a) == 3 and a, driver=d)
    hrefs = {pathlib.PurePosixPath(a.get_attribute("href")).name: a.get_attribute("href") for a in links}
    assert set(hrefs) == {"living_depth.png", "living_depth.npy", "living.ply"}, hrefs
    got = _download(hrefs["living_depth.png"], tmp_path / "downloaded_depth.png")
    expected = vis.depth_to_png16(predictor.predict(load_image(good)))
    assert got.dtype == np.uint16 and got.shape == (96, 128)
    np.testing.assert_array_equal(got, expected)
    cloud = d.find_element(By.CSS_SELECTOR, "#cloud canvas")
    assert cloud.size["width"] > 100 and cloud.size["height"] > 100

    def drawn():  # the points are drawn: pixels of the 3-D view that are not its white background
        with Image.open(io.BytesIO(cloud.screenshot_as_png)) as im:
            return int((np.asarray(im.convert("RGB")).min(-1) < 200).sum())

    print("3-D view pixels drawn:", _wait("points in the 3-D view", lambda: drawn() > 500, driver=d) and drawn())
    assert d.save_screenshot(str(tmp_path / "app.png"))

    # A picture pasted from the clipboard: the same prediction, files named after Gradio's clipboard.png.
    pasted = synthetic.generate_scene(11, 2, 0, 72, 88, split="test").image
    _paste(d, url, _png(pasted))
    _wait("the pasted picture's depth", lambda: "for 88x72 pixels" in d.find_element(By.ID, "timing").text,
          driver=d)
    link = _wait("the pasted picture's 16-bit PNG", lambda: [a.get_attribute("href") for a in d.find_elements(
        By.CSS_SELECTOR, "#downloads a[href]") if a.get_attribute("href").endswith("/clipboard_depth.png")], driver=d)
    got = _download(link[0], tmp_path / "pasted_depth.png")
    np.testing.assert_array_equal(got, vis.depth_to_png16(predictor.predict(pasted)))
    # The paste cleared the upload box, so the button runs the pasted picture; one over --max_pixels is refused.
    assert d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]")
    d.execute_script("arguments[0].click();", d.find_element(By.ID, "run"))
    _wait("the button's run on the pasted picture", lambda: log.read_text().count("vpd-app: clipboard.png 88x72") == 2,
          driver=d)
    _paste(d, url, _png(np.full((600, 800, 3), 120, np.uint8)))
    _wait("the message for the big pasted picture", lambda: "clipboard.png: 800x600 is 480,000 pixels" in body(),
          driver=d)

    # Files the app must refuse: a message on the page, and the app serves the next request.
    for name, (f, message) in bad_files(tmp_path / "bad").items():
        _upload(d, f)
        _wait(f"the message for the {name} file ({message!r})", lambda m=message: m in body(), driver=d)
    # Over --max_upload_mb (2): Gradio refuses the upload before it reaches the app.
    huge = tmp_path / "bad" / "huge.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(huge)
    assert huge.stat().st_size > 2_000_000
    _upload(d, huge)
    _wait("the message for the file over 2 MB", lambda: "exceed the maximum allowed size" in body(), driver=d)
    assert "Traceback" not in body()
    again = room(tmp_path / "again.png", 80, 100, index=1)
    _upload(d, again)
    _wait("the next picture's depth", lambda: "for 100x80 pixels" in d.find_element(By.ID, "timing").text,
          driver=d)
    assert not d.find_elements(By.CSS_SELECTOR, "#paste img")  # an upload clears the pasted picture
    # An example runs on a click, with its scene.
    example = d.find_element(By.XPATH, "//button[contains(., 'room2_')]")
    d.execute_script("arguments[0].click();", example)
    _wait("the example's depth", lambda: "for 320x240 pixels; scene class" in d.find_element(By.ID, "timing").text,
          driver=d)
    assert proc.poll() is None, log.read_text()

    # Stopping the app removes everything it wrote (uploads included).
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()
    assert not list(app_tmp.iterdir()), list(app_tmp.rglob("*"))[:20]  # its TMPDIR: nothing left behind
