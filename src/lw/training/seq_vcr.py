"""Seq-VCR (Arefin et al., ICLR 2025, arXiv 2411.02344): a variance-covariance regularizer on one
layer's states, per sequence position, added to the language-modelling loss.

Formula, as implemented (the paper's Eq. 3, VICReg's covariance convention):

    z = P(h_l)                         h_l: layer l's states (B x T x d); P: linear map to d'
    C_t = 1/(B-1) sum_b (z_bt - mean_b z_bt)(z_bt - mean_b z_bt)^T     (d' x d', one per t)
    L = 1/(T d') sum_t sum_k [ lambda_var * max(0, 1 - sqrt(C_t[k,k] + eta))
                               + lambda_cov * sum_{k' != k} C_t[k,k']^2 ]

The covariance is over the batch at each position (the paper's "sequential" form; its appendix
compares it with pooling batch and length). What was checked against the paper and what is a
choice here is written in docs/how-to/training-study.md.
"""

from __future__ import annotations

import torch
from torch import nn

from lw.errors import check


def seq_vcr_loss(z: torch.Tensor, lambda_var: float = 1.0, lambda_cov: float = 0.004,
                 eta: float = 0.001) -> torch.Tensor:
    """The Seq-VCR loss of projected states ``z`` (B x T x d'), a scalar.

    Memory is T d'^2 (the T covariance matrices): keep d' modest on long sequences.
    """
    check(z.dim() == 3, f"seq_vcr_loss: z has shape {tuple(z.shape)}; expected "
          "(batch, positions, dims)")
    batch, positions, dims = z.shape
    check(batch >= 2, f"seq_vcr_loss: batch of {batch}; the covariance over the batch needs >= 2")
    centred = z - z.mean(dim=0, keepdim=True)
    cov = torch.einsum("btk,btj->tkj", centred, centred) / (batch - 1)   # T x d' x d'
    var = torch.diagonal(cov, dim1=1, dim2=2)                           # T x d'
    var_term = torch.relu(1.0 - torch.sqrt(var + eta)).sum()
    cov_term = cov.pow(2).sum() - var.pow(2).sum()                      # off-diagonal squares
    return (lambda_var * var_term + lambda_cov * cov_term) / (positions * dims)


class SeqVCRProjection(nn.Module):
    """The linear map from layer l's states (d) to the space the loss is computed in (d').

    Trained with the model, used only for the loss: it is not part of the saved checkpoints.
    """

    def __init__(self, hidden_size: int, projection_size: int) -> None:
        super().__init__()
        check(projection_size >= 2, f"train.seq_vcr.projection_size={projection_size}: must be "
              ">= 2")
        self.linear = nn.Linear(hidden_size, projection_size)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.linear(states)


def with_pause_tokens(input_ids: torch.Tensor, labels: torch.Tensor, n: int, pause_id: int,
                      at: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pause tokens inserted at position ``at`` of every sequence (B x T -> B x (T+n)).

    The paper puts the pauses between a question and its answer; in plain text, ``at`` plays the
    question's end. Pause positions carry label -100: the model is never taught to predict a
    pause, and the token after the pauses is predicted from the last pause (Goyal et al. 2023).
    """
    check(n >= 0, f"train.seq_vcr.pause_tokens={n}: must be >= 0")
    if n == 0:
        return input_ids, labels
    batch = input_ids.shape[0]
    pauses = input_ids.new_full((batch, n), pause_id)
    ignored = labels.new_full((batch, n), -100)
    ids = torch.cat([input_ids[:, :at], pauses, input_ids[:, at:]], dim=1)
    out = torch.cat([labels[:, :at], ignored, labels[:, at:]], dim=1)
    return ids, out
