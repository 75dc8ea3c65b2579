"""Task outputs: turn PaliGemma's detection and segmentation answers into boxes, labels and masks, and draw them.

    from palitorch.tasks import parse_detections, draw_detections
    answer = pipe.generate(image, "detect cat ; dog").text
    boxes = parse_detections(answer, image)         # [Detection(label, box=(x0, y0, x1, y1))], in the image's pixels
    draw_detections(image, boxes).save("boxes.png")
"""

from palitorch.tasks.detection import Detection, parse_detections
from palitorch.tasks.draw import draw_detections
from palitorch.tasks.outputs import task_of, task_outputs
from palitorch.tasks.segmentation import (
    Segmentation,
    decode_codes,
    decode_mask,
    load_vae_params,
    parse_segmentations,
)

__all__ = [
    "Detection", "Segmentation", "decode_codes", "decode_mask", "draw_detections", "load_vae_params",
    "parse_detections", "parse_segmentations", "task_of", "task_outputs",
]
