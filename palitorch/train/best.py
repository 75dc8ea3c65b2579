"""The run's best model by an evaluation metric (`[checkpoint] best`), as transformers' Trainer keeps one with
`load_best_model_at_end` and `metric_for_best_model`.

After each periodic evaluation whose figure beats every earlier one (higher is better, but lower for `eval_loss`),
the model is written to RUN/best (Hub layout, atomically, a LoRA run's adapter beside it as in RUN/model) and
RUN/best.json says which step and figure it holds; a metrics row `{"step", "event": "best", ...}` records it too.
Figures are compared only over the same examples: the periodic evaluations' (`[eval] max_examples` of them, the same
subset each time). The model of the last step is a candidate as well: it is evaluated on that subset at the end
(the final evaluation, when it covers the same examples, else one more). A resumed run compares with what the
interrupted one had found by its checkpoint's step (kept in checkpoints and in RUN/best.json), and makes up the
evaluation due at that step if a stop skipped it (SIGTERM skips the evaluation after the checkpoint it writes, and a
resumed run starts after the checkpoint's step): the uninterrupted run had that candidate too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from palitorch.train import ddp, runfolder, state
from palitorch.train.evaluate import summary

LOWER_IS_BETTER = {"eval_loss"}


class Best:
    def __init__(self, metric: str, run: Path):
        self.metric, self.run = metric, run
        self.step: int | None = None
        self.value: float | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.metric)

    def state(self) -> dict:
        """What a checkpoint keeps of it."""
        return {"metric": self.metric, "step": self.step, "value": self.value}

    def restore(self, saved: dict | None, step: int) -> None:
        """The best found up to a resumed checkpoint at `step` (none if of another metric): RUN/best.json's when it
        is of that step or before (the evaluation at a checkpoint's step follows the checkpoint, which cannot hold
        it), else the checkpoint's (a best.json of a later step is of steps the resumed run does again)."""
        try:
            written = json.loads((self.run / "best.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            written = None
        for found in (written, saved):
            if isinstance(found, dict) and found.get("metric") == self.metric and self.metric and \
                    isinstance(found.get("step"), int) and found["step"] <= step and \
                    isinstance(found.get("value"), (int, float)):
                self.step, self.value = found["step"], float(found["value"])
                return

    def catch_up(self, trainer) -> None:
        """On resume at trainer.step: the periodic evaluation due at that step, unless it was done (metrics.jsonl
        has its row: its figures are taken again, in case a stop cut short the keeping of its model)."""
        step, cfg = trainer.step, trainer.cfg
        if not self.enabled or not trainer.eval_examples or not cfg.eval.every or self.step == step:
            return
        if not (step % cfg.eval.every == 0 if step < trainer.total else self.wants_last(cfg)):
            return
        result = logged(self.run, step)
        missing = result is None
        if trainer.dist.enabled:  # every process evaluates, or none
            flag = torch.tensor(float(missing), device=trainer.device)
            missing = float(ddp.all_reduce_sum(flag, trainer.dist)) > 0
        if missing:
            was_logged, result = result is not None, trainer.evaluate()
            if not was_logged:
                trainer.log({"step": step, "eval": result})
            if trainer.dist.main:
                print(summary(f"step {step}", result))
        self.update(trainer, result)

    def beats(self, value: float) -> bool:
        if self.value is None:
            return True
        return value < self.value if self.metric in LOWER_IS_BETTER else value > self.value

    def figure(self, result: dict) -> float | None:
        """The evaluation's figure of the metric (mask_iou: its segmentation answers' mean mask IoU), or None."""
        value = result.get("segments", {}).get("mean_iou") if self.metric == "mask_iou" else result.get(self.metric)
        return None if value is None else float(value)

    def update(self, trainer, result: dict) -> bool:
        """After an evaluation of the periodic subset at trainer.step: keep its model if its figure is the best yet
        (every process calls it; the first writes). True when it was kept."""
        value = self.figure(result) if self.enabled else None
        if value is None or not self.beats(value):
            return False
        self.step, self.value = trainer.step, value
        if trainer.dist.main:
            state.save_model_folder(trainer.model, self.run / "best", trainer.tokenizer_files,
                                    base=trainer._init_path())
            part = self.run / "best.json.part"
            part.write_text(json.dumps(self.state()) + "\n", encoding="utf-8")
            os.replace(part, self.run / "best.json")
            trainer.log({"step": self.step, "event": "best", "metric": self.metric, "value": self.value})
        return True

    def wants_last(self, cfg) -> bool:
        """Whether the last step needs an evaluation of the periodic subset besides the final one (which covers
        other examples: `[eval] final_max_examples` differs from `max_examples`)."""
        return self.enabled and cfg.eval.final_max_examples != cfg.eval.max_examples

    def closing(self) -> str:
        """The closing line's mention of the best model ("" without one)."""
        if not self.enabled or self.step is None:
            return ""
        return f"; the best by {self.metric} ({self.value:.4f}, step {self.step}) is in {self.run / 'best'}"


def logged(run: Path, step: int) -> dict | None:
    """The figures of the periodic evaluation at `step` in RUN/metrics.jsonl, or None."""
    for _, row in reversed(runfolder.metric_rows(run)):
        if row.get("step") == step and isinstance(row.get("eval"), dict) and not row.get("final"):
            return row["eval"]
    return None


def forget(run: Path) -> None:
    """A new run in RUN: the best model an earlier run there left (one stopped before its first checkpoint) is not
    this run's (a resume would take its figure from best.json)."""
    (run / "best.json").unlink(missing_ok=True)
    for name in ("best", "best.old"):
        if (run / name).is_dir():
            shutil.rmtree(run / name)
