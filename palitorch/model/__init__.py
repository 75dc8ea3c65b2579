"""Plain nn.Module model code: no checkpoint files, tokenizer or sampling (kernels.py and quant.py may build, check
and time palitorch's own CPU kernel once per machine, see palitorch.native)."""

from palitorch.model.gemma import Gemma, KVCache, RMSNorm
from palitorch.model.paligemma import Output, PaliGemma, prefix_lm_mask
from palitorch.model.siglip import SigLIP

__all__ = ["Gemma", "KVCache", "Output", "PaliGemma", "RMSNorm", "SigLIP", "prefix_lm_mask"]
