"""A small SentencePiece-style BPE tokenizer for from-scratch models, with PaliGemma's special tokens.

Like Gemma's tokenizer.json: spaces become `▁`, BPE with byte fallback (no unknown characters), no tokens added
automatically. With `dummy_prefix`, each text segment also gets SentencePiece's dummy prefix (as T5's and Llama's
tokenizers do, unlike Gemma's), so a word is one token wherever it stands: the answer "red" and the "red" inside
"is there a red shape?" are then the same token, which a small model trained from scratch needs to connect them.
It holds `<pad> <eos> <bos> <unk> <image>`, `<loc0000>`..`<loc1023>` and `<seg000>`..`<seg127>`, so
the processor code that serves Hub models serves small ones unchanged.

With `split_punctuation`, newlines and `? . , ! ; :` are always pieces of their own, as in Gemma's vocabulary:
otherwise BPE learns merges such as `image?\n`, and the last prompt token (the one that predicts the answer) would
be a different token for every question template instead of the one `\n` separator.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
LOC = [f"<loc{i:04d}>" for i in range(1024)]
SEG = [f"<seg{i:03d}>" for i in range(128)]
BYTES = [f"<0x{i:02X}>" for i in range(256)]
PUNCTUATION = r"[\n?.,!;:]"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, dummy_prefix: bool = False,
                    split_punctuation: bool = False) -> Tokenizer:
    """Train BPE on `texts`; `vocab_size` counts the pieces BPE learns (its alphabet included): the 256 byte
    tokens and the specials come on top of it."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if dummy_prefix:  # every word, a text's first included, is "▁word"; decoding drops the one added space
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)])
    else:  # Gemma's: spaces become "▁", which starts the following piece
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        tok.decoder = decoders.Sequence(steps)
        texts = (t.replace(" ", "▁") for t in texts)
    if split_punctuation:
        isolate = pre_tokenizers.Split(Regex(PUNCTUATION), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([tok.pre_tokenizer, isolate])
    specials = SPECIAL + LOC + SEG
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(specials), special_tokens=specials, initial_alphabet=[], show_progress=False,
        limit_alphabet=1000,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Byte pieces go into the BPE vocabulary itself, so that byte fallback can encode any character.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in BYTES:
        vocab.setdefault(b, len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def save_tokenizer(tok: Tokenizer, folder: str | Path) -> None:
    """Write tokenizer.json plus the tokenizer_config.json / special_tokens_map.json transformers reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "image_token": "<image>", "extra_special_tokens": {"image_token": "<image>"},
        "add_bos_token": False, "add_eos_token": False, "padding_side": "right", "model_max_length": 8192,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2))
