"""Distillation losses: forward KL(teacher || student) at temperature T, full-vocabulary or on cached top-k.

Notation, per token: z the teacher's logits, s the student's, p = softmax(z / T), q = softmax(s / T).

Full vocabulary (online teacher):  KL(p || q) = sum_v p_v (log p_v - log q_v), times T^2 (Hinton et al.: the
gradient of the softened KL shrinks as 1/T^2, so the scale keeps the learning rate meaningful across T).

Cached top-k (offline teacher). The cache holds, per token, the k largest teacher log-probs log p_i (i in K, at
temperature T, fp16), their token ids, and the log of the teacher's remaining mass, log p_tail =
log(1 - sum_K p_i), computed in fp32 from the full distribution when the cache was written (fp16 rounding of
the k values would make 1 - sum_K p_i meaningless when the tail is small). The loss is the KL between the two
distributions coarsened to k + 1 buckets (the k teacher-chosen tokens, and one bucket for all others):

    KL_k = sum_{i in K} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail),   q_tail = 1 - sum_K q_i

with log q_tail computed stably as logsumexp of the student's log-probs outside K. The tail mass is neither
dropped (which would let the student put arbitrary mass outside K) nor renormalised away (which would tell it
that the top k hold all the mass): the student is asked to give the tail exactly the teacher's total tail
mass, without being told how to spread it. Coarsening never increases a KL (the log-sum inequality), so
0 <= KL_k <= KL, with equality when the student's tail is proportional to the teacher's; with k = vocabulary - 1
(the largest k allowed: the tail bucket must not be empty) it is the full KL. Also times T^2.

Both losses are means over tokens, computed in fp32 whatever the logits' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TopK:
    """Cached teacher targets for a micro-batch: [..., k] log-probs and ids, [...] tail log-mass."""

    logp: torch.Tensor
    ids: torch.Tensor
    tail_logp: torch.Tensor


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of T^2 * KL(softmax(z/T) || softmax(s/T)), over the full vocabulary."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.mean() * temperature**2


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopK:
    """What the offline cache stores for each token (before rounding the log-probs to fp16)."""
    logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    top, ids = logp.topk(k, dim=-1)
    return TopK(top, ids, _outside(logp, ids))


def topk_kl(student_logits: torch.Tensor, target: TopK, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of T^2 * KL over k + 1 buckets (the cached top-k tokens and the tail); see above."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    s_k = s.gather(-1, target.ids)
    s_tail = _outside(s, target.ids)
    t_k = target.logp.float()
    t_tail = target.tail_logp.float()
    p_k, p_tail = t_k.exp(), t_tail.exp()
    # xlogy(p, p) = p log p, and 0 where p underflows to 0 (the log-masses themselves stay finite for k < V).
    kl = (torch.xlogy(p_k, p_k) - p_k * s_k).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * s_tail
    return kl.mean() * temperature**2


def next_token_ce(student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the data's next tokens (T = 1), over the positions that have one."""
    logits = student_logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1).long())


def _outside(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `ids`, without cancellation: logsumexp of the other log-probs."""
    return logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
