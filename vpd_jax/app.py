"""``vpd-app`` / ``python -m vpd_jax.app``: depth for one picture at a time, in the browser (a Gradio page).

    python -m vpd_jax.app --checkpoint checkpoints/vpd_nyu            # http://127.0.0.1:7860
    python -m vpd_jax.app                                               # the model `make demo` trained

The model is loaded (and compiled, on a blank window) once at start; every request then runs the same compiled
forward through ``Predictor.predict`` (any image size; the scene row is an argument, so changing the scene costs
nothing). The page shows the input, the depth in colour with a metre scale, a slider between the two, the point
cloud (a .glb with the points of ``predict.py --ply``: NYU's intrinsics scaled to the image), the time the
prediction took, and offers the 16-bit PNG (millimetres), the .npy (metres) and the .ply. Requests are queued and
run one at a time.

A picture comes from the upload box (the file as sent), the paste box (the PNG the browser puts on the
clipboard, kept as sent) or an example; all go through ``DepthService.run``.

Everything the app writes (uploads, pasted pictures, results, the example pictures) goes into one temporary folder
that is removed when the app stops (Ctrl-C or SIGTERM); results older than ``RESULT_AGE_S`` are removed while it
runs. Gradio is imported inside ``build_page`` and ``serve``, so ``--help`` and the flag checks do not pay for it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence

import numpy as np

from vpd_jax import visualize as vis
from vpd_jax.console import ArgumentParser, run_tool, use_compile_cache
from vpd_jax.errors import UsageError, UserError
from vpd_jax.inference.images import IMAGE_SUFFIXES, load_image
from vpd_jax.inference.predictor import MODES, Predictor, Scene
from vpd_jax.scenes import NYU_CLASSES
from vpd_jax.weights.loader import split_source

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_WORKDIR = pathlib.Path("demo_out") / "workdir"  # where demo.py trains (relative to the checkout)
UNKNOWN_SCENE = "unknown (mean of the NYU scenes)"
DEFAULT_MAX_PIXELS = 12_000_000
DEFAULT_MAX_UPLOAD_MB = 25
DEFAULT_MAX_POINTS = 200_000  # points drawn in the 3-D view (the .ply download keeps all)
RESULT_AGE_S = 3600  # results (and Gradio's copies of uploads) older than this are removed while serving
QUEUE_SIZE = 16  # requests waiting beyond this are refused ("queue full") rather than piling up
NUM_EXAMPLES = 3


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(
        prog="python -m vpd_jax.app",
        description="A web page for VPD depth: upload or paste a picture (or pick an example), get its depth as a "
                    "colour map, a 3-D point cloud and 16-bit PNG / .npy / .ply files. Without --checkpoint it serves "
                    "the demo model that `make demo` trained (demo_out/workdir).",
    )
    ap.add_argument("--checkpoint", metavar="SRC",
                    help="converted checkpoint folder, training workdir, or official/mmseg PyTorch file "
                         f"(default: the demo model, {DEMO_WORKDIR})")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0: "
                                                        "every interface)")
    ap.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    ap.add_argument("--mode", choices=MODES,
                    help="as predict.py --mode (default: slide; resize for the demo model, whose 120-pixel crop "
                         "covers a whole 120x160 room)")
    ap.add_argument("--clip", metavar="SOURCE",
                    help="CLIP ViT-L/14 text weights (folder or hub id): adds a free-text scene box")
    ap.add_argument("--crop", type=int, help="training crop (default: the checkpoint's, else 480)")
    ap.add_argument("--stride", type=int, help="window stride (default: crop // 3)")
    ap.add_argument("--no_flip", dest="flip", action="store_false", help="no flip averaging")
    ap.add_argument("--batch_size", type=int, default=4, help="windows per forward pass (default: %(default)s)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype override")
    ap.add_argument("--cmap", default=vis.DEFAULT_CMAP, help="matplotlib colormap (default: %(default)s)")
    ap.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                    help="largest image accepted, in pixels (width x height; default: %(default)s)")
    ap.add_argument("--max_upload_mb", type=int, default=DEFAULT_MAX_UPLOAD_MB,
                    help="largest upload accepted, in MB (default: %(default)s)")
    ap.add_argument("--max_points", type=int, default=DEFAULT_MAX_POINTS,
                    help="most points drawn in the 3-D view; the .ply keeps all (default: %(default)s)")
    return ap


# ------------------------------------------------------------------------------------------- the work


@dataclasses.dataclass
class Result:
    image: np.ndarray  # (H, W, 3) uint8, as the model saw it (EXIF orientation applied)
    depth: np.ndarray  # (H, W) float32 metres
    color: np.ndarray  # colour map with the metre scale on its right
    glb: pathlib.Path | None  # the 3-D view's points (None: no valid depth)
    files: list[pathlib.Path]  # 16-bit PNG, .npy, .ply
    seconds: float  # Predictor.predict alone
    scene: Scene


class DepthService:
    """What the page does, without the page: check an upload, predict, write the files of one request.

    Errors a user can fix (an unreadable file, an image over ``max_pixels``, an empty prompt) are
    ``UserError``s with a one-line message; the page shows them as Gradio errors.
    """

    def __init__(self, predictor: Predictor, workdir: pathlib.Path, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_points: int = DEFAULT_MAX_POINTS, cmap: str = vis.DEFAULT_CMAP, text_encoder=None):
        self.predictor, self.max_pixels, self.max_points, self.cmap = predictor, max_pixels, max_points, cmap
        self.text_encoder = text_encoder
        self.results = pathlib.Path(workdir) / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self._prompts: dict[str, np.ndarray] = {}

    def warm_up(self) -> float:
        """Compile the forward on a blank window (every image runs windows of this one shape); seconds taken."""
        t0 = time.perf_counter()
        self.predictor.predict(np.zeros((*self.predictor.crop, 3), np.uint8))
        return time.perf_counter() - t0

    def conditioned(self, scene: str | None, prompt: str | None = None) -> Predictor:
        """The predictor for a scene choice: a NYU class name, ``UNKNOWN_SCENE``/None, or free text (CLIP)."""
        prompt = (prompt or "").strip()
        if prompt:
            if self.text_encoder is None:
                raise UserError("free-text scenes need CLIP weights: start the app with --clip SOURCE")
            if prompt not in self._prompts:
                if len(self._prompts) >= 256:  # a bounded cache of embedded prompts
                    self._prompts.pop(next(iter(self._prompts)))
                self._prompts[prompt] = np.asarray(self.text_encoder.embed([prompt])[0], np.float32)
            return self.predictor.with_embedding(self._prompts[prompt], Scene("prompt", prompt))
        if scene in (None, "", UNKNOWN_SCENE):
            return self.predictor.for_scene(None)
        if scene not in self.scene_names:
            raise UserError(f"unknown scene {scene!r}; choose one of the model's scenes or {UNKNOWN_SCENE!r}")
        return self.predictor.for_scene(scene)

    @property
    def scene_names(self) -> list[str]:
        """The classes of the model's table (NYU's 27 for the released models)."""
        return list(self.predictor.class_names or NYU_CLASSES)

    def read(self, path: str | os.PathLike) -> np.ndarray:
        """The upload as (H, W, 3) uint8, or a ``UserError`` saying why not (unreadable, too many pixels)."""
        from PIL import Image

        name = pathlib.Path(path).name
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Image.DecompressionBombError:
            raise UserError(f"{name}: the image has more pixels than can be opened safely (over "
                            f"{2 * Image.MAX_IMAGE_PIXELS:,}); make it smaller and try again") from None
        except Exception as e:  # noqa: BLE001 - PIL raises many types for files that are not images
            raise UserError(f"{name}: not a readable image ({_reason(e, path)})") from None
        if w * h > self.max_pixels:
            raise UserError(f"{name}: {w}x{h} is {w * h:,} pixels, larger than this app's limit of "
                            f"{self.max_pixels:,} (--max_pixels); make it smaller and try again")
        try:
            return load_image(path)
        except Exception as e:  # noqa: BLE001 - truncated or damaged data shows up only when decoding
            raise UserError(f"{name}: not a readable image ({_reason(e, path)})") from None

    def run(self, path: str | os.PathLike, scene: str | None = None, prompt: str | None = None) -> Result:
        self._prune()
        image = self.read(path)
        predictor = self.conditioned(scene, prompt)
        t0 = time.perf_counter()
        depth = predictor.predict(image)
        seconds = time.perf_counter() - t0
        out = self.results / uuid.uuid4().hex
        out.mkdir()
        stem = _safe_stem(path)
        lo, hi = vis.depth_range(depth)
        color = vis.colorize(depth, lo, hi, self.cmap)
        color = np.concatenate([color, vis.colorbar(color.shape[0], lo, hi, self.cmap)], axis=1)
        files = [vis.save_depth_png16(out / f"{stem}_depth.png", depth), vis.save_npy(out / f"{stem}_depth.npy", depth)]
        # predict.py --ply's cloud: NYU's Kinect intrinsics scaled to the image (intrinsics=None).
        vis.write_ply(out / f"{stem}.ply", depth, None, image)
        files.append(out / f"{stem}.ply")
        glb = out / f"{stem}_view.glb"
        if vis.write_glb_points(glb, depth, None, image, max_points=self.max_points) == 0:
            glb = None
        return Result(image, depth, color, glb, files, seconds, predictor.scene)

    def _prune(self):
        """Remove the results of requests older than ``RESULT_AGE_S`` (the page has long copied them)."""
        now = time.time()
        for d in self.results.iterdir():
            try:
                if now - d.stat().st_mtime > RESULT_AGE_S:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass


def _reason(e: BaseException, path=None) -> str:
    """An exception as a short phrase for the page; the server-side path of an upload shown as its name only."""
    text = str(e)
    if path is not None:
        text = text.replace(str(path), pathlib.Path(path).name)
    text = " ".join(text.split()) or type(e).__name__
    return text[:200]


def _safe_stem(path) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in pathlib.Path(path).stem)[:80].strip("._")
    return stem or "image"


def write_examples(folder: pathlib.Path, count: int = NUM_EXAMPLES, size: tuple[int, int] = (240, 320)
                   ) -> list[tuple[pathlib.Path, str]]:
    """``count`` synthetic rooms (the demo's scene generator, test split) as JPEGs, with their scene classes."""
    from PIL import Image

    from vpd_jax.data import synthetic

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        s = synthetic.generate_scene(2024, i, 0, *size, split="test")
        path = folder / f"room{i + 1}_{s.scene_class}.jpg"
        Image.fromarray(s.image).save(path, quality=92)
        out.append((path, s.scene_class))
    return out


# ------------------------------------------------------------------------------------------- the page


def describe_model(source: str, demo: bool, predictor: Predictor) -> str:
    if demo:
        return (f"Serving the **demo model** that `make demo` trained on synthetic rooms (`{source}`, "
                f"{predictor.mode} mode). It has only seen those rooms: expect rough depth on real photos. Start "
                "the app with `--checkpoint SRC` for a released VPD model.")
    (ch, cw), (sh, sw) = predictor.crop, predictor.stride
    return (f"Model: `{source}` ({predictor.mode} mode, crop {ch}x{cw}, stride {sh}x{sw}, "
            f"flip {'on' if predictor.flip else 'off'}).")


def build_page(service: DepthService, *, model_note: str, examples: list[tuple[pathlib.Path, str]],
               clip: bool, max_upload_mb: int):
    """The Gradio Blocks of the page (not launched)."""
    import gradio as gr

    def predict(path, scene, prompt):
        if not path:
            raise gr.Error("Upload or paste an image first (or pick an example).", print_exception=False)
        try:
            r = service.run(path, scene, prompt)
        except UserError as e:
            print(f"vpd-app: refused: {e}", file=sys.stderr, flush=True)
            raise gr.Error(str(e), title="Cannot use this", duration=15, print_exception=False) from None
        h, w = r.depth.shape
        lo, hi = vis.depth_range(r.depth)
        if r.glb is None:
            gr.Warning("No pixel has a valid depth: nothing to show in 3-D.")
        text = (f"**Depth in {r.seconds:.2f} s** for {w}x{h} pixels; {r.scene}; "
                f"{lo:.2f} to {hi:.2f} m.")
        print(f"vpd-app: {pathlib.Path(path).name} {w}x{h} in {r.seconds:.2f} s", file=sys.stderr, flush=True)
        plain = vis.colorize(r.depth, lo, hi, service.cmap)  # the slider's pair: same size as the input
        return (r.image, r.color, (r.image, plain), str(r.glb) if r.glb else None, [str(f) for f in r.files],
                text)

    scenes = [UNKNOWN_SCENE, *service.scene_names]
    suffixes = sorted({*IMAGE_SUFFIXES, *(s.upper() for s in IMAGE_SUFFIXES)})
    with gr.Blocks(title="VPD depth", delete_cache=(600, RESULT_AGE_S)) as page:
        gr.Markdown("## VPD depth estimation\n" + model_note)
        # The results first (unrendered), so that the examples in the left column can run the prediction.
        timing = gr.Markdown("Upload or paste an image to see its depth.", elem_id="timing", render=False)
        shown = gr.Image(label="Input", format="png", interactive=False, height=320, elem_id="input_image",
                         render=False)
        depth = gr.Image(label="Depth (colour scale in metres)", format="png", interactive=False, height=320,
                         elem_id="depth_image", render=False)
        slider = gr.ImageSlider(label="Slide between the input and its depth", format="png", interactive=False,
                                height=360, elem_id="slider", render=False)
        cloud = gr.Model3D(label="Point cloud (drag to turn, scroll to zoom)", clear_color=(1, 1, 1, 1),
                           camera_position=(90, 90, None), interactive=False, elem_id="cloud", render=False)
        files = gr.File(label="Downloads: 16-bit PNG (mm), .npy (m), .ply", file_count="multiple",
                        interactive=False, elem_id="downloads", render=False)
        outputs = [shown, depth, slider, cloud, files, timing]
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                upload = gr.File(label=f"Image (JPEG, PNG, WebP, BMP, TIFF; up to {max_upload_mb} MB and "
                                       f"{service.max_pixels / 1e6:g} MP)", file_types=suffixes, type="filepath",
                                 elem_id="upload")
                # Gradio keeps a pasted picture as the file the browser sent (clipboard.png) in the same temporary
                # folder as uploads; with image_mode=None (not its default "RGB", which would convert and re-save
                # it) the path comes untouched, so it reaches DepthService.read like an upload.
                paste = gr.Image(sources=["clipboard"], type="filepath", image_mode=None, label="... or paste a "
                                 "picture (click the box to read the clipboard)", height=160, elem_id="paste")
                scene = gr.Dropdown(scenes, value=UNKNOWN_SCENE, label="Scene (NYU class)", elem_id="scene")
                prompt = gr.Textbox(label="Scene in words (CLIP; overrides the class when filled)",
                                    placeholder="a photo of a garage", visible=clip, elem_id="prompt")
                button = gr.Button("Predict depth", variant="primary", elem_id="run")
                if examples:
                    gr.Examples([[str(p), c] for p, c in examples], inputs=[upload, scene], outputs=outputs,
                                fn=lambda path, sc: predict(path, sc, ""), run_on_click=True,
                                cache_examples=False, label="Examples (synthetic rooms; click to run)",
                                example_labels=[p.stem for p, _ in examples])
            with gr.Column(scale=2):
                timing.render()
                with gr.Row():
                    shown.render()
                    depth.render()
                slider.render()
                cloud.render()
                files.render()
        # The newest picture wins: an upload clears the pasted one and a paste the upload; the button runs the
        # upload if there is one, else the pasted picture.
        upload.upload(predict, [upload, scene, prompt], outputs)
        upload.upload(lambda: None, None, paste, queue=False, show_progress="hidden")
        paste.upload(predict, [paste, scene, prompt], outputs)
        paste.upload(lambda: None, None, upload, queue=False, show_progress="hidden")
        button.click(lambda up, pasted, sc, pr: predict(up or pasted, sc, pr), [upload, paste, scene, prompt],
                     outputs)
    # One request at a time (one model, one device); at most QUEUE_SIZE waiting.
    page.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return page


# ------------------------------------------------------------------------------------------- the command


def _check_port(host: str, port: int):
    """A ``UserError`` if ``host:port`` cannot be listened on (taken, or an address of another machine)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise UserError(f"--host {host}: not an address of this machine ({_reason(e)})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a closed server's port is free
        try:
            s.bind(addr)
        except OSError as e:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({_reason(e)}); "
                            "choose another --port") from None


def demo_checkpoint() -> pathlib.Path | None:
    """The workdir ``make demo`` trains (in the current folder or the checkout), if it holds a checkpoint."""
    for base in (pathlib.Path.cwd(), ROOT):
        wd = base / DEMO_WORKDIR
        if wd.is_dir() and any(wd.iterdir()):
            return wd
    return None


def serve(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("crop", "stride", "batch_size", "max_pixels", "max_upload_mb", "max_points"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: expected a positive number")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: expected 1..65535")
    try:
        vis._lut(args.cmap)
    except ValueError as e:
        raise UsageError(f"--cmap: {e}") from None
    demo = args.checkpoint is None
    if demo:
        found = demo_checkpoint()
        if found is None:
            raise UserError(f"no --checkpoint given and no demo model in {DEMO_WORKDIR}: run `make demo` first "
                            "(it trains one in a few minutes), or pass --checkpoint SRC")
        source = str(found)
    else:
        source = args.checkpoint
        if not split_source(source)[0].exists():  # WORKDIR:latest names WORKDIR
            raise UserError(f"--checkpoint {source}: no such file or folder")
    # Checked before the model loads (minutes with SD-1.5 weights), without importing it (see GRADIO_TEMP_DIR).
    if importlib.util.find_spec("gradio") is None:
        raise UserError("the app needs Gradio: pip install -r requirements-app.txt (or run `make app`)")

    _check_port(args.host, args.port)  # before the model loads, which takes minutes with SD-1.5 weights
    use_compile_cache()
    # The demo model saw whole 120x160 rooms: pictures are brought to that pixel scale (resize), not windowed.
    mode = args.mode or ("resize" if demo else "slide")
    predictor = Predictor.from_checkpoint(source, mode=mode, batch_size=args.batch_size, crop=args.crop,
                                          stride=args.stride, flip=args.flip, dtype=args.dtype)
    text_encoder = None
    if args.clip:
        from vpd_jax.text import TextEncoder

        text_encoder = TextEncoder.from_pretrained(args.clip)

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="vpd-app-"))
    # Gradio reads this when imported: uploads and its copies of our results stay in our folder; so do the
    # half-received uploads it spools through Python's default temporary folder.
    os.environ["GRADIO_TEMP_DIR"] = str(workdir / "gradio")
    (workdir / "tmp").mkdir()
    tempfile.tempdir = str(workdir / "tmp")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        service = DepthService(predictor, workdir, max_pixels=args.max_pixels, max_points=args.max_points,
                               cmap=args.cmap, text_encoder=text_encoder)
        print(f"vpd-app: {source}: compiling the model; files in {workdir} (removed on exit)", file=sys.stderr,
              flush=True)
        print(f"vpd-app: ready in {service.warm_up():.1f} s", file=sys.stderr, flush=True)
        examples = write_examples(workdir / "examples")
        shown = os.path.relpath(source) if pathlib.Path(source).resolve().is_relative_to(pathlib.Path.cwd()) \
            else source
        page = build_page(service, model_note=describe_model(shown, demo, predictor), examples=examples,
                          clip=text_encoder is not None, max_upload_mb=args.max_upload_mb)
        try:
            page.launch(server_name=args.host, server_port=args.port, max_file_size=f"{args.max_upload_mb}mb",
                        allowed_paths=[str(workdir / "examples"), str(service.results)], show_error=False,
                        ssr_mode=False, inbrowser=False, share=False)
        except OSError as e:
            raise UserError(f"--host {args.host} --port {args.port}: cannot listen there ({_reason(e)})") from None
        finally:
            page.close()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        tempfile.tempdir = None
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # Gradio's serving loop closes the server on it; then serve() cleans up


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vpd_jax.app`` / ``vpd-app``: exit 0 (stopped), 1 (a fixable failure) or 2 (a usage mistake)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("USE_TF", "0")  # transformers (for --clip) must not pull in TensorFlow
    try:
        return run_tool(serve, argv)
    except KeyboardInterrupt:  # Ctrl-C while the model loads; once serving, Ctrl-C stops the app with 0
        print("vpd-app: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
