"""The benchmarked models: a ResNet-style CNN with BatchNorm, a small vision transformer, a small MobileNetV2 and a tiny GPT.

Every matrix multiply with a weight is quantized. The vision transformer computes its
attention projections with plain linears (as it did before the package split
``nn.MultiheadAttention`` into quantizable projections, which the tiny GPT relies on).
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_nipq.demo.models import ImageClassifier


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetStyle(ImageClassifier):
    """A CIFAR-style ResNet: a 3x3 stem, ``blocks`` basic blocks per stage, widths ``width * (1, 2, 4)``.

    ``blocks=(2, 2, 2, 2)`` with ``width=64`` and ``stem_stride=4`` is ResNet-18's layout
    (without the stem's max-pool), the size the GPU cost benchmark times.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        blocks: tuple[int, ...] = (1, 1, 1),
        stem_stride: int = 1,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        epochs: int = 10,
    ) -> None:
        super().__init__(num_classes, lr, weight_decay, epochs)
        self.save_hyperparameters()
        stem_kernel = 3 if stem_stride == 1 else 7
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, stem_kernel, stride=stem_stride, padding=stem_kernel // 2, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        channels = width
        for stage, count in enumerate(blocks):
            out_channels = width * 2**stage
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.stages = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.stages(self.stem(x)).mean(dim=(2, 3)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v linear and an output linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: LayerNorm, attention, LayerNorm, GELU MLP, both residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SmallViT(ImageClassifier):
    """A small vision transformer: conv patch embedding, learned positions, ``depth`` blocks, mean-pooled head."""

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 7,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
        lr: float = 2e-3,
        weight_decay: float = 5e-2,
        epochs: int = 10,
    ) -> None:
        super().__init__(num_classes, lr, weight_decay, epochs)
        self.save_hyperparameters()
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) / math.sqrt(dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


class TransformersViT(ImageClassifier):
    """Hugging Face transformers' ``ViTForImageClassification``, built from a ``ViTConfig`` (random start, nothing downloaded).

    A model the package did not write: a class-token, learned position embeddings (a
    learned tensor held by ``ViTEmbeddings``), attention through transformers' attention
    functions, and the library's own module names. transformers is imported when the model
    is built, so the other benchmarks do not need it.
    """

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 7,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
        lr: float = 2e-3,
        weight_decay: float = 5e-2,
        epochs: int = 10,
    ) -> None:
        super().__init__(num_classes, lr, weight_decay, epochs)
        self.save_hyperparameters()
        vit = importlib.import_module("transformers")
        config = vit.ViTConfig(
            image_size=image_size,
            patch_size=patch_size,
            num_channels=in_channels,
            hidden_size=dim,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=mlp_ratio * dim,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=num_classes,
        )
        self.vit = vit.ViTForImageClassification(config)

    def forward(self, x: Tensor) -> Tensor:
        return self.vit(pixel_values=x).logits


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion conv-BN-ReLU6, depthwise 3x3 conv-BN-ReLU6, linear 1x1 projection conv-BN.

    The identity is added when the block keeps the resolution and the channel count.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.layers = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class MobileNetV2Style(ImageClassifier):
    """A small MobileNetV2: a 3x3 stem, depthwise separable inverted-residual blocks, a 1x1 head conv, a linear classifier.

    ``settings`` lists MobileNetV2's ``(expansion, channels, blocks, stride)`` per stage, at
    a CPU-sized scale for 28x28 images; the stem has stride ``stem_stride`` (2, as MobileNetV2's). Every conv is followed by BatchNorm (ReLU6 after all
    but the projections), so a channel's weight scale does not change what the layer
    computes: BatchNorm takes it out. Trained MobileNets (where BatchNorm is folded into the
    weights) have depthwise channels whose ranges differ by orders of magnitude, the case a
    single range per tensor handles worst; ``depthwise_spread`` reproduces it here by
    scaling each depthwise channel's initial weights by a factor log-spaced between 1 and
    ``1 / depthwise_spread`` (in a shuffled order). Since BatchNorm follows, nothing pulls
    the scales together but the optimiser: AdamW's steps do not shrink with the weight, so
    training narrows the spread (30 at initialisation became 5 to 9 after 8 epochs on
    Fashion-MNIST) without erasing it. ``depthwise_spread=1`` is PyTorch's plain initialisation.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        settings: tuple[tuple[int, int, int, int], ...] = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 1, 1)),
        last_channels: int = 128,
        stem_stride: int = 2,
        depthwise_spread: float = 30.0,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        epochs: int = 10,
    ) -> None:
        super().__init__(num_classes, lr, weight_decay, epochs)
        self.save_hyperparameters()
        if depthwise_spread < 1:
            raise ValueError(f"depthwise_spread must be >= 1, got {depthwise_spread}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=stem_stride, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU6()
        )
        blocks: list[nn.Module] = []
        channels = width
        for expand, out_channels, count, stride in settings:
            for index in range(count):
                blocks.append(InvertedResidual(channels, out_channels, stride if index == 0 else 1, expand))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(channels, last_channels, 1, bias=False), nn.BatchNorm2d(last_channels), nn.ReLU6())
        self.classifier = nn.Linear(last_channels, num_classes)
        if depthwise_spread > 1:
            with torch.no_grad():
                for conv in self.depthwise_convs():
                    count = conv.out_channels
                    scales = torch.logspace(0, -math.log10(depthwise_spread), count)[torch.randperm(count)]
                    conv.weight.mul_(scales.view(-1, 1, 1, 1))

    def depthwise_convs(self) -> list[nn.Conv2d]:
        """The depthwise 3x3 convs (one group per channel)."""
        return [m for m in self.modules() if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.head(self.blocks(self.stem(x))).mean(dim=(2, 3)))


class TinyGPT(LightningModule):
    """A small GPT-style byte-level language model: token and position embeddings, causal pre-norm blocks, tied head.

    Unlike `SmallViT`, the blocks are torch's own ``nn.TransformerEncoderLayer`` (pre-norm,
    GELU, no dropout) run with a causal mask, so attention is an ``nn.MultiheadAttention``:
    the package splits it into four quantizable ``nn.Linear`` projections and keeps torch's
    fused fast path off. Both embeddings are ``nn.Embedding`` (quantized, weights only); the
    output layer is an ``nn.Linear`` that shares the token embedding's weight (one weight
    quantizer, stored once) unless ``tie=False``.

    A batch is ``(x, y)``: ``(batch, tokens)`` token ids and the same shifted by one; the
    loss is the mean next-token cross-entropy. AdamW, a linear warm-up over the first
    ``warmup`` share of the steps, then cosine to zero.
    """

    def __init__(
        self,
        vocab: int = 256,
        context: int = 128,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        tie: bool = True,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        warmup: float = 0.05,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.context, self.lr, self.weight_decay, self.warmup = context, lr, weight_decay, warmup
        self.tok_embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, mlp_ratio * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed.weight, std=0.02)
        if tie:
            self.head.weight = self.tok_embed.weight

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.shape[1]
        if tokens > self.context:
            raise ValueError(f"at most {self.context} tokens, got {tokens}")
        h = self.tok_embed(x) + self.pos_embed(torch.arange(tokens, device=x.device))
        mask = nn.Transformer.generate_square_subsequent_mask(tokens, device=x.device, dtype=h.dtype)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        decay = [p for p in self.parameters() if p.dim() >= 2]
        rest = [p for p in self.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=self.lr
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warm = max(int(self.warmup * total), 1) if self.warmup > 0 else 0

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(total - warm, 1))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
