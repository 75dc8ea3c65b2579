"""The objects a task prompt's answer names, as JSON-ready fields: shared by `palitorch run --json`, `batch` and
`serve`."""

from __future__ import annotations

from palitorch.tasks.detection import parse_detections
from palitorch.tasks.segmentation import parse_segmentations


def task_of(prompt: str) -> str:
    """The task word a PaliGemma prompt starts with: "detect", "segment", "caption", ... (after a leading <image>,
    which the processor takes as the image's place)."""
    words = prompt.removeprefix("<image>").split(maxsplit=1)
    return words[0].lower() if words else ""


def task_outputs(prompt: str, text: str, width: int, height: int) -> dict:
    """{"detections": [...]} for a detect prompt, {"segmentations": [...]} for a segment prompt (boxes in pixels of
    the `width` x `height` image), else {}."""
    task = task_of(prompt)
    if task == "detect":
        return {"detections": [d.to_dict() for d in parse_detections(text, width, height)]}
    if task == "segment":
        return {"segmentations": [s.to_dict() for s in parse_segmentations(text, width, height)]}
    return {}
