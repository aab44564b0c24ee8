"""Depth for anyone's images: ``Predictor`` (the Python API) and the library side of ``predict.py``; class maps
from a segmentation model: ``Segmenter`` (``segmenter.py``).

    >>> from vpd_jax import Predictor
    >>> p = Predictor.from_checkpoint("checkpoints/vpd_nyu")   # converted dir, workdir or official/mmseg .pth
    >>> depth = p.predict(image)                                  # (H, W, 3) uint8 -> (H, W) float32 metres

Any size and aspect ratio (asked for in wl-zhao/VPD GitHub issues 4, 34, 39 and 42: the references only take
480, 352 or 512 squares, ``VPDDepth.forward`` in wl-zhao/VPD depth/models_depth/model.py):

* ``mode="slide"`` (default): the evaluator's test-time augmentation (wl-zhao/VPD depth/test.py; mmsegmentation
  mmseg/models/segmentors/depth_estimator.py) at the image's own resolution: windows of the model's training
  crop (480 for the released NYU models) placed by mmseg's ``slide_flip`` rule at stride crop/3 (on 480x640
  that is the official x = 0 and 160), each averaged with its flipped prediction, merged by overlap count. An
  image smaller than the crop in either side is first upscaled (bilinear, aspect kept) until it covers the crop,
  then the prediction is resized back. Upscaling rather than padding: padding would show the model a small
  picture inside a grey frame it never saw in training, and metric depth from one image hangs on the apparent
  size of things, which a frame changes and an upscale (to the pixel scale of the training frames) does not.
* ``mode="resize"``: the image is resized (bilinear, aspect kept) so that its short side is the crop — NYU's
  pixel scale — then windowed as above and the prediction resized back to the input size (mmseg's 512 recipe,
  generalised). Better for photos much larger than 640x480 whose field of view is a whole room.

Scene conditioning (wl-zhao/VPD depth/models_depth/model.py, depth/dump_nyu_text_embeddings.py; mmsegmentation
mmseg/models/backbones/vpd.py): a NYU scene class (``scene="kitchen"``), a free-text ``prompt`` embedded by CLIP
(``clip=`` weights), or by default the table's last row, the mean of the 27 scenes (mmseg's "unknown").
The row is looked up on the host and passed as ``text_embeddings``, so every choice runs one compiled model.

All windows of a batch of equal-size images, and their flips, go through one jitted forward in chunks of
``batch_size`` rows (the last chunk padded), so the model compiles once per window shape.
"""

from vpd_jax.inference.files import Outputs, Summary, gather_inputs, predict_files
from vpd_jax.inference.images import IMAGE_SUFFIXES, as_rgb, load_image
from vpd_jax.inference.predictor import DEFAULT_CROP, MODES, Predictor, Scene, working_size
from vpd_jax.inference.segmenter import Segmenter

__all__ = ["DEFAULT_CROP", "IMAGE_SUFFIXES", "MODES", "Outputs", "Predictor", "Scene", "Segmenter", "Summary",
           "as_rgb", "gather_inputs", "load_image", "predict_files", "working_size"]
