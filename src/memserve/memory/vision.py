"""What images cost a vision-language runner, beyond its text plan: pure arithmetic, tested as a table.

The vision tower's weights are in the checkpoint's safetensors headers with the rest, so the text plan counts
them already; the image tokens sit in the prompt, so the KV cache for the context counts them too. What is
left grows with the images a request may carry (``wire/images.py: ImageLimits``):

- **decoded images**: the runner decodes every image of a request at its full size before the processor
  resizes them, one request at a time on its event loop. Measured on the tiny demo LLaVA (CLIP tower,
  transformers 5.24, Pillow 13, fp32), the worst-case warm-up's peak above the runner at rest:
  1 image of 1024² 16.9 MiB, 1 of 2048² 67.9 MiB, 4 of 2048² 152.1 MiB, 2 of 4096² 337.2 MiB. That is
  ~7 bytes a pixel for every image held (Pillow's 4-byte RGBX and the processor's uint8 array) and ~10–12
  more for the one image being rescaled (float32 RGB): priced as ``pixels × (7 × images + 12)``, 1.05–1.20 ×
  those measurements.
- **resized images** (a tiling tower, Idefics3/SmolVLM v1): that processor resizes every image so its longest
  edge is ``size.longest_edge`` (2048 px for SmolVLM, small images too) before it cuts the tiles, and holds
  every image of the request in float32 at that size, its tiles, and its outputs (``pixel_values`` and an int64
  ``pixel_attention_mask``) at once. Measured on the processor alone (transformers 5.24's
  ``Idefics3ImageProcessorPil``, a thread sampling RSS every 0.5 ms, noisy 2048² PNGs): 2048/512 tiles, 1 image
  233 MiB above the decoded images, 4 images 971 MiB; 1456/364, 2 images 198 MiB. That is 49–61 bytes per
  resized pixel per image: priced as ``RESIZED_BYTES_PER_PIXEL`` (62) ×  images × ``resized_pixels``.
- **pixels**: the processor's float32 ``pixel_values`` at the tower's size (every tile of a tiling tower), cast
  to the model's dtype, and a tiling tower's ``pixel_attention_mask``, which the runner keeps as one byte a pixel
  (``runner/vision.py``; the processor's is int64).
- **the tower's forward**: all images (all tiles) of every row of a ``generate`` call at once
  (``concurrency × images × tiles``): its residual stream and MLP per patch, and its attention scores (eager in
  the worst case).
- **image features**: the projector's output, held through the prefill (``mm_encoder_outputs``), and its
  input and hidden in flight.
- **request bodies**: the runner reads, parses and validates a request's body and builds its prompt one
  request at a time (``ImageCompleter.preparing``), then lets the body go: base64 images make bodies tens of
  MiB, and a burst read at once would hold them all. Measured on the tiny demo LLaVA with 4 images of 2048²
  (5 MiB PNGs, 25.6 MiB bodies) before that lock, 2 requests at once (concurrency 1) peaked 160 MiB above the
  worst-case warm-up, 8 at once (concurrency 4) 431 MiB: 2–3 copies of each body (the chunks, the joined
  bytes, the parsed JSON); priced as ``BODY_COPIES ×`` the largest body, once.
- **waiting requests**: a request in the runner's queue holds its prompt and its ``pixel_values`` (float32),
  so ``waiting`` requests add those, not their bodies. The planner prices the default queue
  (``planner.image_requests_held``); the runner prepares no more requests than that, whatever ``max_queue`` says.
"""

from __future__ import annotations

from dataclasses import dataclass

from memserve.checkpoint.vision import VisionFacts
from memserve.memory.estimate import DTYPE_WIDTH, HIDDEN_TENSORS

__all__ = [
    "BODY_COPIES",
    "HELD_BYTES_PER_PIXEL",
    "RESIZED_BYTES_PER_PIXEL",
    "WORKING_BYTES_PER_PIXEL",
    "ImageCost",
    "image_cost",
]

HELD_BYTES_PER_PIXEL = 7  # every decoded image of the request being prepared (measured, see above)
WORKING_BYTES_PER_PIXEL = 12  # the one image the processor is rescaling, float32 RGB
RESIZED_BYTES_PER_PIXEL = 62  # a tiling processor's work per image at its resize target (measured, see above)
PIXEL_VALUES_WIDTH = 4  # processors return float32
MASK_WIDTH = 1  # a tiling tower's pixel_attention_mask, as the runner keeps it (bool)
BODY_COPIES = 3  # copies of a request body a runner holds while it prepares it (measured, see above)


@dataclass(frozen=True)
class ImageCost:
    """Bytes images add to a vision-language runner's plan, by what holds them; ``total_bytes`` is the sum,
    which the planner adds to the plan's activations."""

    decoded_bytes: int
    pixel_bytes: int
    tower_bytes: int
    feature_bytes: int
    body_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.decoded_bytes + self.pixel_bytes + self.tower_bytes + self.feature_bytes + self.body_bytes


def image_cost(
    vision: VisionFacts,
    dtype: str,
    *,
    images: int,
    max_pixels: int,
    concurrency: int,
    max_body_bytes: int = 0,
    waiting: int = 0,
) -> ImageCost:
    """What ``images`` per request (the cap), each up to ``max_pixels``, cost at ``concurrency`` sequences with
    ``waiting`` more requests queued, bodies being up to ``max_body_bytes``.

    Reading a body and decoding its images happen one request at a time; the tensors after that are held by
    every accepted request, and the tower's work by each sequence until its call ends."""
    if images <= 0:
        return ImageCost(0, 0, 0, 0)
    bodies = BODY_COPIES * max_body_bytes
    width = DTYPE_WIDTH[dtype]
    decoded = max_pixels * (HELD_BYTES_PER_PIXEL * images + WORKING_BYTES_PER_PIXEL)
    decoded += images * vision.resized_pixels * RESIZED_BYTES_PER_PIXEL
    in_flight = concurrency * images
    tile_pixels = vision.image_size**2
    image_values = vision.tiles * vision.channels * tile_pixels
    mask = vision.tiles * tile_pixels * MASK_WIDTH if vision.resized_pixels else 0
    held = (in_flight + waiting * images) * (image_values * PIXEL_VALUES_WIDTH + mask)
    pixels = held + in_flight * (image_values * width + mask)
    patches = vision.patches
    stream = patches * (HIDDEN_TENSORS * vision.hidden_size + 2 * vision.intermediate_size) * width
    scores = vision.heads * patches * patches * (width + 4)
    tower = in_flight * vision.tiles * (stream + scores)
    features = in_flight * vision.image_tokens * (vision.hidden_size + 2 * vision.text_hidden_size) * width
    return ImageCost(decoded, pixels, tower, features, bodies)
