"""The training loop: `Trainer(cfg, resume).fit()`, what `palitorch train CONFIG` runs.

One optimizer step consumes one global batch (`[train] batch_size` examples, a pure function of seed and step),
split into contiguous shares per process and micro-batches per share. Each micro-batch's mean suffix-token loss is
weighted by its share of the global batch's suffix tokens, so the accumulated, all-reduced gradient is the gradient
of the global batch's mean loss: 1 process or N, 1 micro-batch or many, the numbers agree (up to float rounding).

Run folder: config.toml (resolved), tokenizer/ (learned or copied), metrics.jsonl, checkpoint-NNNNNNN/ (Hub layout +
training state, newest K kept), model/ (the final weights for palitorch.load and transformers); see runfolder.py.
A resume starts from the newest checkpoint that reads completely (state.read), saying which newer ones it skipped.

Images are read before step 1 (images.py); without the image cache each step's images are read on a thread while
the step before computes (feed.py). `request_stop` (the CLI's SIGTERM handler) ends the loop at the next step
boundary with a checkpoint there.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from palitorch.errors import ConfigError, Interrupted
from palitorch.train import best, build, continuation, ddp, evaluate, feed, lora, runfolder, state
from palitorch.train.best import Best
from palitorch.train.config import TrainConfig
from palitorch.train.data import Dataset, fingerprint, global_batch, read_jsonl, repeat_by_task
from palitorch.train.images import ImageError, Images


class Trainer:
    prefetch = True  # without the image cache, read step s + 1's images on a thread while step s computes

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg
        t = cfg.train
        self.dist, self.device = ddp.setup(t.device)
        self.show = t.progress and self.dist.main  # progress bars
        self.stop: str | None = None  # what asked the loop to stop (request_stop), for the closing message
        self._stopping, self._in_loop, self._saved_step = False, False, -1
        self.run = Path(t.out)
        found = state.checkpoints(self.run)
        if resume and not found:
            raise ConfigError(f"--resume: {self.run} has no checkpoint to resume from")
        if found and not resume:
            raise ConfigError(f"{self.run} already holds checkpoints: pass --resume to continue that run, or choose "
                              "another folder with --train.out")
        if not resume:
            runfolder.check_new_run(self.run)
        # Newer checkpoints that do not read completely are skipped (and put aside once the resume is under way).
        self.saved, self.skipped = state.newest_readable(found) if resume else (None, [])
        self.resume_from = self.saved.folder if self.saved else None
        if self.saved:  # (before the model is read)
            continuation.check_model(self.saved.state.get("config", {}), cfg, self.resume_from.name)
        runfolder.lock_run(self.run, self.dist, self.device)  # one run trains in a folder, until fit ends
        if self.dist.main:
            gone = runfolder.remove_leftovers(self.run)
            if gone:
                print(f"palitorch train: removed {', '.join(gone)} (left by an interrupted write)", file=sys.stderr)
            if not resume:
                (self.run / "metrics.jsonl").unlink(missing_ok=True)
                best.forget(self.run)  # an earlier run's best model, if it left one
                (self.run / "config.toml").write_text(cfg.to_toml())  # first: it marks the folder as a run's
        ddp.barrier(self.dist)
        torch.manual_seed(t.seed + self.dist.rank)

        raw = [e for f in cfg.data.train for e in read_jsonl(f)]
        if cfg.warmstart.epochs and (listed := [e for e in raw if isinstance(e.image, tuple)]):
            raise ConfigError(f'{listed[0].where}: "image" is a list: [warmstart] takes one image per example; set '
                              "[warmstart] epochs = 0, or give each example one image")
        self.fingerprint = fingerprint(cfg.data.train)
        self.model, self.processor, self.tokenizer_files = self._build(raw)
        if t.gradient_checkpointing:
            self.model.vision_tower.gradient_checkpointing = True
            self.model.language_model.gradient_checkpointing = True

        self.images = Images(self.processor.image_size, cfg.data.cache_images, self.processor.resample)
        self.train_examples = repeat_by_task(raw, cfg.data.task_repeat)
        cap = cfg.model.max_length  # from scratch the processor's context already; fine-tuning a cap below it
        self.data = Dataset(self.train_examples, self.processor, self.images, cfg.data.per_image, cap)
        self.late_data = None  # the mix from step [data] late_from on
        if cfg.data.late_from > 0:
            late = repeat_by_task(raw, {**cfg.data.task_repeat, **cfg.data.late_task_repeat})
            self.late_data = Dataset(late, self.processor, self.images, cfg.data.per_image, cap)
        self.raw_train = raw
        self.eval_examples = read_jsonl(cfg.data.eval) if cfg.data.eval else []
        self.eval_data = Dataset(self.eval_examples, self.processor, self.images, max_length=cap) \
            if self.eval_examples else None

        if t.batch_size < self.dist.world:
            raise ConfigError(f"[train] batch_size {t.batch_size} is smaller than the {self.dist.world} processes")
        per_epoch = len(self.data) // t.batch_size
        for data in [d for d in (self.data, self.late_data) if d is not None]:
            if len(data) < t.batch_size:
                raise ConfigError(f"training examples: {len(data)}, under one [train] batch_size ({t.batch_size})")
        self.total = t.steps or max(1, math.ceil(t.epochs * per_epoch))
        self.per_epoch = per_epoch

        if cfg.lora.rank:  # the adapters, and what [lora] also_train names besides
            self.trainable = build.set_trainable(self.model, ["*.lora_a", "*.lora_b"], extra=cfg.lora.also_train,
                                                 what="[lora] also_train pattern")
            lora.check_frozen(self.model)
        else:
            self.trainable = build.set_trainable(self.model, t.trainable)
        self.opt, self.names = build.optimizer(self.model, cfg.optim)
        for warning in build.warnings(cfg, self.model, self.eval_data) if self.dist.main else ():
            print(f"palitorch train: warning: {warning}", file=sys.stderr)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.step = 0
        # sums over the steps since the last metrics row: kept in checkpoints, so that a resumed run's next row
        # averages the same steps as the uninterrupted run's
        self.window = continuation.log_window(None)
        self.best = Best(cfg.checkpoint.best, self.run)  # [checkpoint] best: the best model by a metric
        evaluate.vae_params(cfg.eval.vae)  # [eval] vae, read before step 1: a damaged file stops the run here
        if self.saved is not None:
            self._restore(self.saved)
        self.ahead = feed.Ahead(self.images, self.image_paths, self.prefetch and not cfg.data.cache_images)
        wanted = feed.wanted_images(self) if cfg.data.cache_images else None
        feed.read_images(self.images, wanted, self.dist, self.device, self.show)

    # ------------------------------------------------------------------ setup

    def _build(self, raw):
        """The model and processor; the tokenizer files every checkpoint gets are kept in RUN/tokenizer/."""
        cfg, d = self.cfg, self.dist
        tok_dir = self.run / "tokenizer"
        folder = self.resume_from or (Path(cfg.model.init) if cfg.model.init else None)
        if d.main:  # one process writes (BPE training need not be bit-reproducible across processes), all read
            if folder is None:
                build.learn_tokenizer(raw, cfg.model.vocab_size, tok_dir, cfg.model.dummy_prefix,
                                      cfg.model.split_punctuation)
            else:  # a copy: checkpoints are pruned, and the files must outlive the one they came from
                build.copy_tokenizer(folder, tok_dir)
        ddp.barrier(d)
        if folder is not None:
            model, processor = build.from_folder(folder, cfg.model.dtype, self.device, cfg.model.max_length)
        else:
            model, processor = build.from_scratch(cfg.model, tok_dir)
            build.init_weights(model, cfg.model.init_std, cfg.train.seed)
            if cfg.model.smooth_locs:
                locs = [processor.token_id(f"<loc{i:04d}>") for i in range(1024)]
                build.smooth_loc_embeddings(model, locs, cfg.model.init_std, cfg.train.seed)
        model = model.to(self.device).train()
        if cfg.lora.rank:
            lora.setup(model, cfg, self.resume_from)
        return model, processor, build.tokenizer_files(tok_dir)

    def _restore(self, saved: state.Saved) -> None:
        st, folder = saved.state, saved.folder
        continuation.check_identity(st, continuation.identity(self), folder.name)
        if saved.step > self.total:  # [train] steps is a total: going on would only write these weights to model/
            raise ConfigError(f"--resume: {folder.name} is at step {saved.step}, past this run's {self.total} steps "
                              f"(a total, not steps to add): use --train.steps {saved.step + self.total} for "
                              f"{self.total} more")
        state.load_optimizer(self.opt, self.names, saved,
                             "[lora] also_train" if self.cfg.lora.rank else "[train] trainable")
        if self.dist.main and (changes := continuation.optim_changes(st.get("config", {}), self.cfg)):
            print(f"palitorch train: --resume: [optim] {'; '.join(changes)} (from step {saved.step} on)",
                  file=sys.stderr)
        state.restore_rng(saved, self.dist, self.device)
        self.step = self._saved_step = saved.step
        self.window = continuation.log_window(st.get("log_window"))
        self.best.restore(st.get("best"), saved.step)
        self.saved = None  # its optimizer tensors are in the optimizer now
        if self.dist.main:
            for damaged, why in self.skipped:
                aside = runfolder.put_aside(damaged)
                print(f"palitorch train: warning: {why}; resuming from the older {folder.name} (the damaged "
                      f"checkpoint is kept as {aside.name})", file=sys.stderr)
            runfolder.trim_metrics(self.run, self.step)  # forget what the interrupted run logged after this step
            (self.run / "config.toml").write_text(self.cfg.to_toml())

    def warmstarts(self) -> bool:
        """Whether fit begins with the warm-start ([warmstart] epochs, on a new run only)."""
        return self.cfg.warmstart.epochs > 0 and self.step == 0 and self.resume_from is None

    def periodic_evals(self) -> bool:
        """Whether an evaluation falls between this step and the last (never without an eval set)."""
        every = self.cfg.eval.every
        return bool(every and self.eval_examples) and (self.step // every + 1) * every < self.total

    def log(self, row: dict) -> None:
        if self.dist.main:
            runfolder.append_metrics(self.run, row)

    def _autocast(self):
        if self.cfg.train.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self, step: int) -> dict:
        """Forward/backward over this process's share of global batch `step`, all-reduce, clip, AdamW."""
        t, d = self.cfg.train, self.dist
        data = self.data_at(step)
        idx = global_batch(len(data), t.batch_size, t.seed, step, data.order)
        n_targets = int(data.targets[idx].sum())  # loss tokens of the GLOBAL batch, known to every process
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro, images in zip(self.micro_batches(step), self.ahead.get(step, self.total)):
            batch = data.batch(micro, self.cfg.augment, t.seed, step, images)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self._autocast():
                out = self.model(**batch, return_logits=False)
            n = (batch["labels"][:, 1:] != -100).sum()
            loss = out.loss * (n / n_targets)  # this micro-batch's share of the global mean
            loss.backward()
            total_loss += loss.detach().double()
        ddp.all_reduce_grads(self.params, d)
        ddp.all_reduce_sum(total_loss, d)
        lr = build.lr_at(step, self.total, self.cfg.optim)
        for group in self.opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if self.cfg.optim.clip_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip_grad_norm))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params])))
        if not (math.isfinite(float(total_loss)) and math.isfinite(norm)):  # (the same on every process)
            raise state.diverged(self.run, step, float(total_loss), norm)  # (the update is not applied)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": float(total_loss), "lr": lr, "grad_norm": norm, "tokens": int(data.lengths[idx].sum())}

    def micro_batches(self, step: int) -> list[list[int]]:
        """The examples of this process's micro-batches of global batch `step` (a pure function of the step)."""
        t, data = self.cfg.train, self.data_at(step)
        idx = global_batch(len(data), t.batch_size, t.seed, step, data.order)
        mine = idx[ddp.shard(len(idx), self.dist)]
        micro = t.micro_batch_size or len(mine)
        return [mine[lo: lo + micro] for lo in range(0, len(mine), micro)]

    def image_paths(self, step: int) -> list[list[Path]]:
        """The images of each of `micro_batches(step)`, in pixel_values order (what feed.Ahead reads)."""
        return [self.data_at(step).paths(m) for m in self.micro_batches(step)]

    def data_at(self, step: int) -> Dataset:
        """The examples step `step` draws from: the late mix from [data] late_from on, if one is set."""
        late = self.late_data is not None and step >= self.cfg.data.late_from
        return self.late_data if late else self.data

    # ------------------------------------------------------------------ evaluation and checkpoints

    def evaluate(self, final: bool = False) -> dict:
        """The eval set's metrics; a periodic one ends early if a stop is asked for (the loop drops its figures)."""
        return evaluate.of_run(self, final)

    def _init_path(self) -> str | None:
        """[model] init as an absolute path (what a LoRA run's PEFT files name as their base), or None."""
        return str(Path(self.cfg.model.init).expanduser().resolve()) if self.cfg.model.init else None

    def save_checkpoint(self) -> None:
        rng = state.rng_tensors(self.dist, self.device)  # collective: every process takes part
        if self.dist.main:
            st = {"step": self.step, "epoch": self.step / self.per_epoch, "total_steps": self.total,
                  **continuation.identity(self), "world_size": self.dist.world,
                  "data_order": continuation.DATA_ORDER,
                  "lr": build.lr_at(max(0, self.step - 1), self.total, self.cfg.optim),
                  "log_window": dict(self.window), "best": self.best.state(),
                  "config": self.cfg.to_dict()}
            state.save(self.run, self.step, self.model, self.opt, self.names, st, rng, self.tokenizer_files,
                       self.cfg.checkpoint.keep, self._init_path())
        ddp.barrier(self.dist)
        self._saved_step = self.step

    # ------------------------------------------------------------------ stopping early (SIGTERM)

    def request_stop(self, why: str) -> bool:
        """Ask the loop to stop at the next step boundary, with a checkpoint there (`why`, e.g. "SIGTERM", goes into
        the closing message). Safe to call from a signal handler. False when the loop is not running or a stop was
        asked already: the caller should then interrupt at once (KeyboardInterrupt)."""
        accepted = self._in_loop and self.stop is None
        self.stop = self.stop or why
        self._stopping = self._stopping or accepted
        return accepted

    def _stop_agreed(self) -> bool:
        """Whether any process was asked to stop: under torchrun a collective, so that all stop at the same step."""
        if not self.dist.enabled:
            return self._stopping
        flag = ddp.all_reduce_sum(torch.tensor(float(self._stopping), device=self.device), self.dist)
        if bool(flag > 0) and self.stop is None:
            self.stop = "a signal to another process"
        return bool(flag > 0)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to the last step, write model/, evaluate. Ctrl-C raises Interrupted, which says how to go on."""
        try:
            return self._fit()
        except KeyboardInterrupt as e:  # checkpoints are written atomically: the newest complete one is intact
            if not self.dist.main:
                raise Interrupted() from e
            ckpt = state.checkpoints(self.run)
            why = f"stopped by {self.stop}" if self.stop else "interrupted"
            after = f"{why} after step {self.step} of {self.total}"
            if not ckpt:
                raise Interrupted(f"{after}, before the first checkpoint: rerun without --resume") from e
            raise Interrupted(f"{after}; the last checkpoint is step {ckpt[-1][0]}: rerun with --resume to continue "
                              "from it") from e
        except ImageError as e:  # met by this process alone, maybe (its share of a batch): only the first prints
            if not self.dist.main:
                print(f"palitorch train: error: {e} (process {self.dist.rank})", file=sys.stderr)
            raise
        finally:
            self.ahead.close()
            runfolder.unlock(self.run)

    def _fit(self) -> dict:
        cfg, t, d = self.cfg, self.cfg.train, self.dist
        fit_started = time.perf_counter()
        total_params, trainable_params = build.count_parameters(self.model)
        if d.main:
            self.log({"step": self.step, "event": "resume" if self.resume_from else "start",
                      "parameters": total_params, "trainable": trainable_params, "examples": len(self.data),
                      "late_examples": len(self.late_data) if self.late_data is not None else 0,
                      "steps": self.total, "steps_per_epoch": self.per_epoch, "world_size": d.world,
                      "device": str(self.device)})
        if d.main and cfg.eval.every and not self.eval_examples:
            print(f"palitorch train: no [data] eval set: the evaluations every {cfg.eval.every} steps ([eval] every) "
                  "are skipped", file=sys.stderr)

        def bar(total, desc):
            return tqdm(total=total, desc=desc, dynamic_ncols=True, disable=not self.show)

        if self.warmstarts():
            from palitorch.train.warmstart import warmstart

            started = time.perf_counter()
            ws = warmstart(self.model, self.processor, self.raw_train, self.images, cfg, d, self.device,
                           self._autocast, bar)
            ws["warmstart"]["seconds"] = round(time.perf_counter() - started, 2)
            self.log({"step": 0, **ws})

        if self.resume_from is not None:  # the evaluation at the checkpoint's step, if a stop skipped it
            self.best.catch_up(self)
        pbar = tqdm(total=self.total, initial=self.step, desc="train", dynamic_ncols=True, disable=not self.show)
        run = continuation.log_window(None)  # sums over this session's steps (for the closing summary)
        self._in_loop = True
        while not self._stop_agreed() and self.step < self.total:
            started = time.perf_counter()
            out = self.train_step(self.step)
            elapsed = time.perf_counter() - started
            self.step += 1
            window = self.window
            for sums in (window, run):
                for k, v in (("steps", 1), ("loss", out["loss"]), ("tokens", out["tokens"]), ("time", elapsed)):
                    sums[k] += v
            pbar.update(1)
            pbar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}",
                             tok_s=f"{out['tokens'] / max(elapsed, 1e-9):.0f}", refresh=False)
            if self.step % t.log_every == 0 or self.step == self.total:
                self.log({"step": self.step, "epoch": round(self.step / self.per_epoch, 4),
                          "loss": window["loss"] / window["steps"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                          "tokens_per_s": window["tokens"] / window["time"],
                          "ms_per_step": 1000 * window["time"] / window["steps"]})
                self.window = continuation.log_window(None)
            last = self.step == self.total
            if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or last:
                self.save_checkpoint()  # first: an evaluation can take minutes (and fail)
            # a stop asked for (SIGTERM) skips or cuts short the evaluation: the grace period before SIGKILL is short
            due = self.step % cfg.eval.every == 0 and not last if cfg.eval.every else False
            if self.eval_examples and (due or last and self.best.wants_last(cfg)) and not self._stop_agreed():
                result = self.evaluate()
                if not self._stop_agreed():
                    self.log({"step": self.step, "eval": result})
                    if d.main:  # printed with or without the progress bar
                        tqdm.write(evaluate.summary(f"step {self.step}", result))
                    self.best.update(self, result)
        self._in_loop = False
        pbar.close()
        if self.stop is not None:  # asked to stop (request_stop): the work so far is kept in a checkpoint
            if self._saved_step != self.step:
                self.save_checkpoint()
            raise KeyboardInterrupt
        if d.main:
            state.save_model_folder(self.model, self.run / "model", self.tokenizer_files, base=self._init_path())
            if run["steps"]:
                self.log({"step": self.step, "event": "done", "train_seconds": round(run["time"], 2),
                          "wall_seconds": round(time.perf_counter() - fit_started, 2),
                          "steps_per_s": run["steps"] / run["time"], "tokens_per_s": run["tokens"] / run["time"]})
        ddp.barrier(d)
        result = self.evaluate(final=True)
        if result:
            self.log({"step": self.step, "eval": result, "final": True})
            if not self.best.wants_last(cfg):  # (the final evaluation covers the periodic ones' examples)
                self.best.update(self, result)
        if d.main:
            if result:
                print(evaluate.summary(f"step {self.step}", result))
            print(f"trained {run['steps']} step{'s' * (run['steps'] != 1)} ({self.step} of {self.total} in all) in "
                  f"{run['time']:.1f} s; the model is in {self.run / 'model'}{self.best.closing()}")
        ddp.barrier(d)  # processes leave together: gloo can abort one whose peer tears down its connections early
        return result
