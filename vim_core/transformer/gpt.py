"""VIM: a decoder-only Transformer over raster-order image tokens (stage 2 of Yu et al., 2021).

Sequence layout. Index 0 holds a prefix: the class embedding for a conditional model (with one extra
"null" class for classifier-free guidance), or a learned start vector for an unconditional one. Index
i >= 1 holds token t_{i-1}. The output at index i predicts t_i, so a grid of L tokens is modelled by a
sequence of L positions and t_{L-1} is never an input. Index i carries the position embedding of the
cell it predicts (row i // W, column i % W), so the head always knows where the next token lands.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vim_core.config.transformer import TransformerModelConfig, resolve_model
from vim_core.layers import MLP
from vim_core.transformer.kv_cache import KVCache

# Sampling with a KV cache asks attention for a new key length at every step. cuDNN's kernel builds a
# plan per shape, so on an H200 bf16 sampling of 32 VIM-Base images took over 67 s with it and 7.4 s
# with the memory-efficient kernel (benchmarks/README.md, GPU acceptance); it is left out there.
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, layer_idx: int):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.layer_idx = layer_idx  # which slice of a KVCache belongs to this layer
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        mask, causal = None, True
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, start)
            t_new = q.shape[2]
            if t_new == 1:
                causal = False  # one query at the newest position may see every cached key
            elif start > 0:
                # Several new queries after a cached prefix: causal with an offset.
                q_pos = torch.arange(start, start + t_new, device=x.device)
                mask = q_pos[:, None] >= torch.arange(start + t_new, device=x.device)[None, :]
                causal = False
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            with sdpa_kernel(DECODE_BACKENDS):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.resid_drop(self.proj(rearrange(y, "b h t d -> b t (h d)")))


class Block(nn.Module):
    """Pre-norm Transformer block."""

    def __init__(self, cfg: TransformerModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg.dim, cfg.heads, cfg.dropout, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, cfg.mlp_dim, cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start)
        return x + self.mlp(self.ln_2(x))


class VIM(nn.Module):
    """Decoder-only Transformer predicting codebook ids in raster order, optionally class-conditional."""

    def __init__(
        self, cfg: "TransformerModelConfig | str", vocab_size: int, grid: int | tuple[int, int]
    ) -> None:
        super().__init__()
        cfg = resolve_model(cfg)
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
        self.seq_len = self.grid[0] * self.grid[1]
        self.num_classes = cfg.num_classes
        self.null_class = cfg.num_classes  # the extra class id used for CFG and for "no label"

        self.tok_emb = nn.Embedding(vocab_size, cfg.dim)
        if self.num_classes > 0:
            self.cls_emb = nn.Embedding(self.num_classes + 1, cfg.dim)
        else:
            self.start = nn.Parameter(torch.zeros(cfg.dim))
        if cfg.pos_embedding == "2d":
            self.row_emb = nn.Parameter(torch.zeros(self.grid[0], cfg.dim))
            self.col_emb = nn.Parameter(torch.zeros(self.grid[1], cfg.dim))
        else:
            self.pos_emb = nn.Parameter(torch.zeros(self.seq_len, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, vocab_size, bias=False)
        self._init_weights()

    def start_from_conditional(self, source: "VIM") -> None:
        """Make this unconditional VIM a copy of the class-conditional `source` whose start vector is the
        source's null-class embedding: before any step it predicts what the source predicts for the null
        class. A source that is not class-conditional, or whose parts differ, is a ValueError; one whose
        tensors have other shapes is load_state_dict's RuntimeError."""
        if self.num_classes != 0 or source.num_classes == 0:
            raise ValueError("want a class-conditional VIM to start an unconditional one from")
        state = {k: v for k, v in source.state_dict().items() if k != "cls_emb.weight"}
        missing, unexpected = self.load_state_dict(state, strict=False)  # a shape mismatch raises here
        if missing != ["start"] or unexpected:
            raise ValueError(f"the VIMs differ in parts: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            self.start.copy_(source.cls_emb.weight[source.null_class])

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=0.02)
        # GPT-2: shrink the residual projections so the stream's variance does not grow with depth.
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.cfg.layers))

    def spec(self) -> dict:
        """What it takes to rebuild this model: store it beside the weights."""
        return {"config": self.cfg.model_dump(), "vocab_size": self.vocab_size, "grid": list(self.grid)}

    @classmethod
    def from_spec(cls, spec: dict) -> "VIM":
        return cls(TransformerModelConfig(**spec["config"]), spec["vocab_size"], tuple(spec["grid"]))

    def make_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        ref = self.head.weight
        return KVCache(
            self.cfg.layers,
            batch_size,
            self.cfg.heads,
            self.seq_len,
            self.cfg.dim // self.cfg.heads,
            device=device or ref.device,
            dtype=dtype or ref.dtype,
        )

    def _prefix(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if self.num_classes == 0:
            if labels is not None:
                raise ValueError("this VIM is unconditional (num_classes=0) but labels were given")
            return self.start.expand(batch, 1, -1)
        if labels is None:
            labels = torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        elif self.training and self.cfg.cfg_dropout > 0:
            # Classifier-free guidance needs the model to also learn p(x) under the null class.
            drop = torch.rand(labels.shape, device=device) < self.cfg.cfg_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.cls_emb(labels)[:, None]

    def _positions(self, start: int, length: int) -> torch.Tensor:
        if self.cfg.pos_embedding == "full":
            return self.pos_emb[start : start + length]
        idx = torch.arange(start, start + length, device=self.row_emb.device)
        return self.row_emb[idx // self.grid[1]] + self.col_emb[idx % self.grid[1]]

    def _embed(
        self, tokens: torch.Tensor, labels: torch.Tensor | None, start: int
    ) -> tuple[torch.Tensor, int]:
        x = self.tok_emb(tokens)
        if start == 0:
            x = torch.cat([self._prefix(labels, tokens.shape[0], tokens.device), x], dim=1)
        if start + x.shape[1] > self.seq_len:
            raise ValueError(
                f"sequence of {start + x.shape[1]} positions exceeds the model's {self.seq_len}; "
                "feed at most seq_len - 1 tokens after the prefix"
            )
        return self.drop(x + self._positions(start, x.shape[1])), x.shape[1]

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        input_pos: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T', V) for the positions fed; loss when targets (B, T') are given.

        Without a cache: tokens (B, T <= L-1) are t_0..t_{T-1}, the prefix is prepended and T' = T+1, so
        training is `model(x[:, :-1], y, targets=x)`. With a cache, input_pos (default cache.pos) is the
        sequence index of the first fed element; the prefix is prepended only at input_pos 0.
        """
        start = input_pos if input_pos is not None else (cache.pos if cache is not None else 0)
        if cache is None and start != 0:
            raise ValueError("input_pos > 0 needs a KV cache holding the earlier positions")
        x, length = self._embed(tokens, labels, start)
        for block in self.blocks:
            x = block(x, cache, start)
        logits = self.head(self.ln_f(x))
        if cache is not None:
            cache.pos = start + length
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        return logits, loss

    def compute_loss(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token cross-entropy over a full grid of tokens (B, L)."""
        return self(tokens[:, :-1], labels, targets=tokens)[1]

    def features(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None, block: int | None = None
    ) -> torch.Tensor:
        """Average-pooled, layer-normalised outputs (B, dim) of block `block` (0-based; default middle).

        tokens is a full grid (B, L); its last token is dropped, as in training. A conditional model
        sees the null class when labels is None, so the probe cannot read the label off the prefix.
        """
        block = self.cfg.layers // 2 if block is None else block
        if not 0 <= block < self.cfg.layers:
            raise ValueError(f"block {block} out of range for {self.cfg.layers} layers")
        return self.block_features(tokens, labels, last=block)[block]

    def block_features(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None, last: int | None = None
    ) -> list[torch.Tensor]:
        """features() of blocks 0..last (default: every block) from one forward pass, for a probe curve."""
        last = self.cfg.layers - 1 if last is None else last
        x, _ = self._embed(tokens[:, : self.seq_len - 1], labels, 0)
        out = []
        for b in self.blocks[: last + 1]:
            x = b(x)
            # Per-token normalisation without learned affine (as iGPT), so no single position dominates.
            out.append(F.layer_norm(x, (x.shape[-1],)).mean(dim=1))
        return out

    def configure_optimizers(
        self, weight_decay: float, lr: float, betas: tuple[float, float] = (0.9, 0.96)
    ) -> torch.optim.AdamW:
        """AdamW with decay on Linear weights only; biases, norms and embeddings are not decayed."""
        decay_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        decay = [p for p in self.parameters() if id(p) in decay_ids]
        no_decay = [p for p in self.parameters() if id(p) not in decay_ids]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = torch.cuda.is_available() and all(p.is_cuda for p in self.parameters())
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)

    def num_params(self, non_embedding: bool = False) -> int:
        skip = set()
        if non_embedding:
            skip = {id(p) for n, p in self.named_parameters() if "emb" in n or n == "start"}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per token, PaLM/nanoGPT style: 6N + 12 * l * d * T."""
        n = self.num_params(non_embedding=True)
        return 6.0 * n + 12.0 * self.cfg.layers * self.cfg.dim * self.seq_len
