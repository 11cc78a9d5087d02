"""Tiny models with the structures kiln prunes, seeded: a BERT from a transformers config and a
stack of MBConv blocks laid out as EfficientNet writes them (no downloads, built in milliseconds)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_bert(layers: int = 2, heads: int = 4, hidden: int = 32, intermediate: int = 64, batch: int = 2, seq: int = 8):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=intermediate,
                                     max_position_embeddings=32)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1, seq // 2:] = 0  # padding in the second row, so masked attention is exercised
    return model, (ids, mask)


class MBConv(nn.Module):
    """Expand 1x1 -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 -> project 1x1 -> BN, residual when shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int = 3, stride: int = 1, se: bool = False):
        super().__init__()
        width = cin * expand
        self._expand_conv = nn.Conv2d(cin, width, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(width)
        self._depthwise_conv = nn.Conv2d(width, width, kernel, stride, kernel // 2, groups=width, bias=False)
        self._bn1 = nn.BatchNorm2d(width)
        if se:  # squeeze-and-excitation reads the expanded channels too: kiln leaves such blocks alone
            self._se_reduce = nn.Conv2d(width, 4, 1)
            self._se_expand = nn.Conv2d(4, width, 1)
        self._project_conv = nn.Conv2d(width, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout)
        self._act = nn.ReLU6()
        self._residual = cin == cout and stride == 1

    def forward(self, x):
        y = self._act(self._bn0(self._expand_conv(x)))
        y = self._act(self._bn1(self._depthwise_conv(y)))
        if hasattr(self, "_se_reduce"):
            y = y * torch.sigmoid(self._se_expand(torch.relu(self._se_reduce(y.mean((2, 3), keepdim=True)))))
        y = self._bn2(self._project_conv(y))
        return x + y if self._residual else y


class TinyConvNet(nn.Module):
    def __init__(self, se_in_last: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.blocks = nn.Sequential(MBConv(8, 8, 4), MBConv(8, 12, 6, kernel=5, stride=2), MBConv(12, 12, 4, se=se_in_last))
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def tiny_convnet(batch: int = 2, size: int = 16, se_in_last: bool = False):
    """The conv net with BatchNorm statistics that are not the identity (a few training batches run)."""
    torch.manual_seed(0)
    model = TinyConvNet(se_in_last)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.normal_(0.0, 0.1, generator=gen)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size, generator=gen))
    model.eval()
    return model, (torch.randn(batch, 3, size, size, generator=gen),)
