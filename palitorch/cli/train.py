"""`palitorch train CONFIG.toml [--resume] [--section.key value ...]`: train from scratch or fine-tune.

Data-parallel on N processes: `torchrun --nproc-per-node N -m palitorch train CONFIG.toml`.

SIGTERM (Slurm, Kubernetes, docker stop, torchrun passing on a stop) during the training loop: the step in progress
finishes, a checkpoint is saved there and the command exits 143 (128 + SIGTERM) with a line on how to resume; a
second SIGTERM, or one outside the loop, stops at once as Ctrl-C does (the newest checkpoint is intact either way).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from palitorch.cli.common import one_line_errors

EPILOG = """\
examples:
  palitorch train configs/easyvqa-default.toml
  palitorch train configs/finetune.toml --model.init path/to/paligemma --optim.lr 3e-5 --train.steps 500
  palitorch train configs/easyvqa-default.toml --resume            # continue from the newest checkpoint
  torchrun --nproc-per-node 2 -m palitorch train configs/easyvqa-default.toml
every field of the config file can be overridden as --section.key value (see --print-config)."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a PaliGemma from scratch or fine-tune one",
        description="Train a PaliGemma from a TOML config: from scratch or from a Hub checkpoint ([model] init).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    one_line_errors(p)
    p.add_argument("config", help="TOML training config")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in [train] out")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    overrides = p.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value pairs")
    overrides.required = False  # argparse counts a REMAINDER positional as required: "required: config, overrides"
    p.set_defaults(func=run)


def run(args) -> int:
    from palitorch.train.config import load_config
    from palitorch.train.loop import Trainer
    from palitorch.train.runfolder import check_can_create

    overrides = list(args.overrides)
    for flag in ("--resume", "--print-config"):  # also accepted after the overrides
        while flag in overrides:
            overrides.remove(flag)
            setattr(args, flag[2:].replace("-", "_"), True)
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(cfg.to_toml())
        return 0
    from palitorch.train import build, ddp

    if cfg.model.init and not args.resume:  # a resumed run reads its own checkpoint instead
        build.check_checkpoint_folder(Path(cfg.model.init))
    check_can_create(cfg.train.out)
    term = Terminate()
    main_thread = threading.current_thread() is threading.main_thread()  # only it can set signal handlers
    before = signal.signal(signal.SIGTERM, term) if main_thread else None
    try:
        term.trainer = Trainer(cfg, resume=args.resume)
        term.trainer.fit()
    except KeyboardInterrupt as e:
        if not term.received:
            raise  # Ctrl-C: the CLI says the line and exits 130
        if os.environ.get("RANK", "0") == "0":  # under torchrun the first process speaks for all
            print(f"palitorch train: {str(e) or 'stopped by SIGTERM before training started'}", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)
        ddp.teardown()
    return 0


class Terminate:
    """The SIGTERM handler: the first signal in the training loop asks it to stop at the next step boundary with a
    checkpoint (Trainer.request_stop); otherwise it interrupts at once."""

    def __init__(self):
        self.trainer, self.received = None, False

    def __call__(self, signum, frame) -> None:
        self.received = True
        if self.trainer is not None and self.trainer.request_stop("SIGTERM"):
            if os.environ.get("RANK", "0") == "0":  # os.write: a print could meet the one this signal interrupted
                os.write(2, b"\npalitorch train: SIGTERM: stopping after the step in progress, with a checkpoint "
                            b"there (another SIGTERM stops at once)\n")
            return
        raise KeyboardInterrupt
