"""Two users' own architectures for the tests, as a user would put them under `architectures/`.

Builders follow the `arch: module:function` contract of tasks/models.py: `build(input_shape, n_classes,
**options)` returning an nn.Module, sized from plain integers so they also build on the meta device.
Configure them as `{"arch": "tests.user_architectures:resnet", "width": 8}` or
`{"arch": "tests.user_architectures:transformer", "dim": 16}`.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv + batch norm with a residual add; a 1x1 conv projects the shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, n_classes: int, width: int, blocks: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        # Stage 1 keeps the width; stage 2 doubles it and halves the resolution (the one projection shortcut).
        stages = [BasicBlock(width, width) for _ in range(blocks)]
        stages += [BasicBlock(width, 2 * width, stride=2)] + [BasicBlock(2 * width, 2 * width)
                                                               for _ in range(blocks - 1)]
        self.blocks = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def resnet(input_shape: list[int], n_classes: int, width: int = 8, blocks: int = 2) -> nn.Module:
    """ResNet-style CNN: stem, `blocks` residual blocks per stage over two stages, global average pooling."""
    return ResNet(input_shape[0], n_classes, width, blocks)


class PatchTransformer(nn.Module):
    """Image patches and one learned token per class go through a transformer encoder; the class scores come
    from the pooled patch tokens through a head whose weight IS the class-token embedding (tied parameters)."""

    def __init__(self, input_shape: list[int], n_classes: int, dim: int, heads: int, layers: int, mlp: int,
                 patch: int):
        super().__init__()
        channels, height, width = input_shape
        self.patch = patch
        n_patches = (height // patch) * (width // patch)
        self.patch_embedding = nn.Linear(channels * patch * patch, dim)
        self.class_tokens = nn.Embedding(n_classes, dim)
        self.position = nn.Parameter(torch.randn(1, n_patches, dim) * 0.02)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, batch_first=True), layers,
            enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)
        self.head.weight = self.class_tokens.weight
        self.register_buffer("class_ids", torch.arange(n_classes), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [batch, C, H, W] -> [batch, patches, C * patch * patch]
        patches = nn.functional.unfold(x, self.patch, stride=self.patch).transpose(1, 2)
        tokens = self.patch_embedding(patches) + self.position
        classes = self.class_tokens(self.class_ids).unsqueeze(0).expand(x.shape[0], -1, -1)
        encoded = self.encoder(torch.cat([classes, tokens], dim=1))
        return self.head(self.norm(encoded[:, len(self.class_ids):].mean(dim=1)))


def transformer(input_shape: list[int], n_classes: int, dim: int = 16, heads: int = 2, layers: int = 2,
                mlp: int = 32, patch: int = 4) -> nn.Module:
    """Small transformer classifier over `patch` x `patch` patches of an image, with a tied output head."""
    return PatchTransformer(list(input_shape), n_classes, dim, heads, layers, mlp, patch)
