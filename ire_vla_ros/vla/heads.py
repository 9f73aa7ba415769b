"""Action head and critic on top of the backbone's last hidden states (the paper's design).

Both are a token learner (attention pooling, Set-Transformer PMA style: learned queries attend over
the m hidden states) followed by an MLP. The actor outputs the mean of a Gaussian over the
*normalized* action with a learned, state-independent log-std; the critic outputs one value.
The robot's joint positions (normalized) are concatenated to the pooled vector: the paper's head
sees only the VLM tokens, but on an arm the proprioception is free and cheap.
"""
from __future__ import annotations

import torch
from torch import nn


class TokenLearner(nn.Module):
    """Pools (B, m, d) hidden states into (B, num_queries * width) with learned attention queries."""

    def __init__(self, in_dim: int, width: int, num_queries: int = 4, num_heads: int = 4):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, width))
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.out_dim = num_queries * width

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(hidden.float())
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        pooled, _ = self.attn(q, x, x, key_padding_mask=~mask.bool())
        return self.norm(pooled + q).flatten(1)


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.GELU()]
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    return nn.Sequential(*mods)


class TokenLearnerMLP(nn.Module):
    """Token learner + MLP; the shared structure of actor and critic."""

    def __init__(self, feat_dim: int, state_dim: int, out_dim: int, width: int = 128, num_queries: int = 4):
        super().__init__()
        self.pool = TokenLearner(feat_dim, width, num_queries)
        self.mlp = mlp(self.pool.out_dim + state_dim, 2 * width, out_dim)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.pool(hidden, mask), state], dim=-1))


class GaussianActionHead(TokenLearnerMLP):
    def __init__(self, feat_dim: int, state_dim: int, action_dim: int, width: int = 128,
                 num_queries: int = 4, init_log_std: float = -1.0):
        super().__init__(feat_dim, state_dim, action_dim, width, num_queries)
        self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))
        # Small last layer: the initial policy predicts the mean action, not noise.
        nn.init.zeros_(self.mlp[-1].bias)
        self.mlp[-1].weight.data.mul_(0.1)

    def distribution(self, hidden, mask, state) -> torch.distributions.Normal:
        mean = self(hidden, mask, state)
        std = self.log_std.clamp(-5.0, 1.0).exp().expand_as(mean)
        return torch.distributions.Normal(mean, std)


class CriticHead(TokenLearnerMLP):
    def __init__(self, feat_dim: int, state_dim: int, width: int = 128, num_queries: int = 4):
        super().__init__(feat_dim, state_dim, 1, width, num_queries)

    def forward(self, hidden, mask, state) -> torch.Tensor:  # (B,)
        return super().forward(hidden, mask, state).squeeze(-1)
