"""VQAv2 and COCO Captions, from their official annotation files and a folder of COCO images, as palitorch JSONL
(`palitorch data vqav2`, `palitorch data coco-captions`): the layout `palitorch train` and `palitorch eval` read,
with every reference answer in an "answers" list for `palitorch eval --metrics vqa` / `cider`.

    VQAv2 questions  {"data_subtype": "val2014", "questions": [{"image_id", "question", "question_id"}, ...]}
    VQAv2 answers    {"annotations": [{"question_id", "multiple_choice_answer", "answers": [{"answer"}, ...] (10),
                                       "answer_type": "yes/no" | "number" | "other", "question_type"}, ...]}
    COCO captions    {"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]}

A VQAv2 line: `{"image", "prefix": "answer en <question>", "suffix": <the most common answer>, "answers": [its ten],
"question_id", "answer_type", "question_type"}` (the prompt PaliGemma's VQAv2 transfer uses). A COCO line, one per
image: `{"image", "prefix": "caption en", "suffix": <its first caption>, "answers": [all its captions], "image_id"}`.
Image files are found in the images folder by the name COCO gives them: COCO_val2014_000000000042.jpg (2014
splits, from the questions file's data_subtype) or 000000000042.jpg (2017 splits); for captions, by file_name
(or its 2017 form).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from palitorch.errors import InputError


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from `path`, or a one-line InputError saying what the file should be."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {str(p)!r} {'is a folder' if p.is_dir() else 'does not exist'}: give the JSON file")
    try:
        data = json.loads(p.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{what} {p} is not valid JSON ({getattr(e, 'msg', 'not UTF-8')})") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} {p} is not a JSON object")
    return data


def _field(data: dict, key: str, what: str, path) -> list:
    value = data.get(key)
    if not isinstance(value, list):
        raise InputError(f'{what} {path} has no "{key}" list: is it the right file?')
    return value


def _find(folder: Path, names: list[str]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def _relative(path: Path, out: Path) -> str:
    """An image path as a JSONL line names it: relative to the JSONL's folder (absolute if on another drive)."""
    try:
        return os.path.relpath(path.resolve(), out.parent.resolve())
    except ValueError:
        return str(path.resolve())


def _missing(found: int, missing: list[str], images: Path) -> None:
    if missing:
        raise InputError(f"{len(missing)} of {found + len(missing)} images are not in {images} (the first: "
                         f"{missing[0]}): give the folder that holds them, or --skip-missing to leave their lines out")


def vqav2_lines(questions: str | Path, annotations: str | Path, images: str | Path, out: Path, lang: str = "en",
                limit: int | None = None, skip_missing: bool = False) -> list[dict]:
    """The JSONL lines of a VQAv2 split (see the module's docstring)."""
    qs = read_json(questions, "--questions")
    ans = read_json(annotations, "--annotations")
    subtype = str(qs.get("data_subtype") or "")
    by_id = {}
    for a in _field(ans, "annotations", "--annotations", annotations):
        if isinstance(a, dict) and "question_id" in a:
            by_id[a["question_id"]] = a
    if not by_id:
        raise InputError(f'--annotations {annotations} has no answers to questions (entries with "question_id"): is '
                         "it the right file?")
    folder = Path(images)
    if not folder.is_dir():
        raise InputError(f"--images {str(folder)!r} is not a folder: give the folder of the COCO images")
    lines, missing, unanswered = [], [], 0
    for q in _field(qs, "questions", "--questions", questions):
        if limit is not None and len(lines) >= limit:
            break
        try:
            image_id, text, qid = int(q["image_id"]), q["question"], q["question_id"]
            if not isinstance(text, str):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise InputError(f'--questions {questions}: a question needs "image_id", "question" (text) and '
                             f'"question_id": {json.dumps(q)[:80]}') from None
        a = by_id.get(qid)
        if a is None:
            unanswered += 1
            continue
        names = [f"COCO_{subtype}_{image_id:012d}.jpg"] * bool(subtype) + [f"{image_id:012d}.jpg"]
        path = _find(folder, names)
        if path is None:
            missing.append(names[0])
            continue
        answers = [str(x["answer"]) for x in a.get("answers", []) if isinstance(x, dict) and "answer" in x]
        best = a.get("multiple_choice_answer")
        if not answers or not isinstance(best, str):
            raise InputError(f'--annotations {annotations}: question {qid} has no "answers" list or no '
                             f'"multiple_choice_answer": is it the right file?')
        lines.append({"image": _relative(path, out), "prefix": f"answer {lang} {' '.join(text.split())}",
                      "suffix": best, "answers": answers, "question_id": qid,
                      "answer_type": a.get("answer_type", ""), "question_type": a.get("question_type", "")})
    if not skip_missing:
        _missing(len(lines), missing, folder)
    if not lines:
        what = f"{unanswered} questions have no annotation (a test split?)" if unanswered else "no questions"
        raise InputError(f"--questions {questions}: nothing to write ({what})")
    return lines


def coco_caption_lines(annotations: str | Path, images: str | Path, out: Path, lang: str = "en",
                       limit: int | None = None, skip_missing: bool = False) -> list[dict]:
    """The JSONL lines of a COCO captions split, one per image with captions (see the module's docstring)."""
    data = read_json(annotations, "--annotations")
    captions: dict[int, list[str]] = {}
    for a in _field(data, "annotations", "--annotations", annotations):
        if isinstance(a, dict) and isinstance(a.get("caption"), str) and "image_id" in a:
            captions.setdefault(a["image_id"], []).append(" ".join(a["caption"].split()))
    folder = Path(images)
    if not folder.is_dir():
        raise InputError(f"--images {str(folder)!r} is not a folder: give the folder of the COCO images")
    lines, missing = [], []
    for im in _field(data, "images", "--annotations", annotations):
        if limit is not None and len(lines) >= limit:
            break
        if not isinstance(im, dict) or im.get("id") not in captions or not isinstance(im.get("file_name"), str):
            continue
        name = im["file_name"]
        short = re.fullmatch(r"COCO_[a-z]+\d{4}_(\d+\.jpg)", name)  # COCO_val2014_000000000042.jpg: 2017's name
        path = _find(folder, [name] + ([short[1]] if short else []))
        if path is None:
            missing.append(im["file_name"])
            continue
        refs = captions[im["id"]]
        lines.append({"image": _relative(path, out), "prefix": f"caption {lang}", "suffix": refs[0], "answers": refs,
                      "image_id": im["id"]})
    if not skip_missing:
        _missing(len(lines), missing, folder)
    if not lines:
        raise InputError(f"--annotations {annotations}: no image with captions to write")
    return lines


def write_jsonl(lines: list[dict], out: Path) -> None:
    """All the lines or none: a temporary file beside `out`, then a rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    part.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    os.replace(part, out)
