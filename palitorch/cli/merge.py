"""`palitorch merge`: a PEFT LoRA adapter merged into its model, written as a Hub-layout folder of its own.

The folder holds the merged weights (in the checkpoint's own dtype unless `--dtype`), config.json,
preprocessor_config.json and the checkpoint's tokenizer and generation files: a plain PaliGemma that palitorch and
transformers load without PEFT. The merge is the one `--adapter` makes at load (checkpoint/adapter.py).

    palitorch merge --model path/to/paligemma-3b-pt-224 --adapter my-lora --out my-model
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from palitorch.cli.common import not_a_folder, one_line_errors
from palitorch.errors import InputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "merge", help="merge a PEFT LoRA adapter into its model and write a Hub-layout folder",
        description="Merge a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors) into its model and "
                    "write the result as a Hub-layout checkpoint folder, which palitorch and transformers load "
                    "without PEFT.",
    )
    one_line_errors(p)
    p.add_argument("--model", metavar="DIR", help="the adapter's base checkpoint folder, or its Hub id in the local "
                   "Hugging Face cache (default: the base model the adapter names, else the bundled model)")
    p.add_argument("--revision", metavar="REV", help="with a Hub id: the cached branch, tag or commit (default: main)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="the PEFT LoRA adapter folder (or its Hub id in "
                   "the cache)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new, or empty)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's own)")
    p.add_argument("--max-shard-size", type=int, default=0, metavar="MB",
                   help="split the weights into shards of at most MB megabytes, with an index (default 0: one file)")
    p.set_defaults(func=merge)


def merge(args: argparse.Namespace) -> int:
    from palitorch.checkpoint import load_model, merge_adapter, read_adapter, resolve_dtype, save_model
    from palitorch.checkpoint.io import check_checkpoint_folder, weights_dtype
    from palitorch.inference.inputs import model_paths
    from palitorch.train.build import tokenizer_files

    if args.model is None and args.revision is not None:
        raise InputError("--revision applies to --model given as a Hub id: add --model OWNER/NAME, or leave "
                         "--revision out")
    model_dir, adapter = model_paths(args.model, args.revision, args.adapter)
    out = Path(args.out).expanduser()
    check_checkpoint_folder(model_dir)
    read_adapter(adapter)  # before the (slow) load
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {args.out} {'is a file' if not out.is_dir() else 'is not empty'}: give a new folder")
    if not out.parent.is_dir():
        raise InputError(f"--out {args.out}: {not_a_folder(out.parent)}")
    try:  # a real folder made and removed there: permissions alone miss a read-only or pseudo file system (/proc)
        os.rmdir(tempfile.mkdtemp(prefix=".palitorch-probe-", dir=out.parent))
    except OSError:
        raise InputError(f"--out {args.out}: cannot write in its folder {str(out.parent)!r}: choose another") from None
    if args.max_shard_size < 0:
        raise InputError(f"--max-shard-size must be >= 0 (0: one file), got {args.max_shard_size}")
    dtype = resolve_dtype(args.dtype) if args.dtype else weights_dtype(model_dir)
    model = load_model(model_dir, "cpu", dtype)
    changed = merge_adapter(model, adapter)
    save_model(model, out, extra_files=tokenizer_files(model_dir),
               max_shard_bytes=args.max_shard_size << 20 if args.max_shard_size else None)
    print(f"palitorch merge: {adapter} merged into {model_dir} ({len(changed)} weights changed, "
          f"{str(dtype).removeprefix('torch.')}): {out}", file=sys.stderr)
    return 0
