"""`--predictions -` (eval) and `--output -` (batch) in a shell script whose output goes to a file (`{ ...; } > out`):
the lines land where the shell's next output follows them, none overwritten (cli/results.open_output)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from palitorch.assets import ASSETS_DIR

ROOT = Path(__file__).resolve().parents[2]


def shell(script: str, folder: Path) -> list[str]:
    """`{ echo START; SCRIPT; echo END; } > out.txt` run in `folder` -> out.txt's lines."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PALITORCH": f"{sys.executable} -m palitorch"}
    cmd = f"{{ echo START; {script} 2>/dev/null; echo END; }} > out.txt"
    subprocess.run(["bash", "-c", cmd], cwd=folder, env=env, check=True, timeout=300)
    return (folder / "out.txt").read_text().splitlines()


def test_eval_predictions_to_standard_output_keep_their_place(tmp_path):
    rows = [{"image": "a.png", "prefix": "q", "suffix": "red", "answer": "red"},
            {"image": "b.png", "prefix": "q", "suffix": "blue", "answer": "green"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = shell("$PALITORCH eval --data d.jsonl --given answer --predictions -", tmp_path)
    assert lines[0] == "START" and lines[-1] == "END" and len(lines) == 4
    assert [json.loads(x)["prediction"] for x in lines[1:3]] == ["red", "green"]


def test_batch_output_to_standard_output_keeps_its_place(tmp_path):
    image = str(ASSETS_DIR / "easyvqa_test_0.png")
    requests = [{"image": image, "prompt": "caption en", "max_new_tokens": 4}] * 2
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    lines = shell("$PALITORCH batch --input r.jsonl --output - --device cpu", tmp_path)
    assert lines[0] == "START" and lines[-1] == "END" and len(lines) == 4
    assert sorted(json.loads(x)["index"] for x in lines[1:3]) == [1, 2]  # (line numbers)
