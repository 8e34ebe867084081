"""Naive float64 references, written independently of src/dft (full logits, log_softmax, gather)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ref_topk_entropy(logits, k):
    """EAFT's entropy of the top-k distribution over ln k, written from the definition (sort, softmax)."""
    k = min(k, logits.shape[-1])
    top = logits.double().sort(dim=-1, descending=True).values[..., :k]
    q = F.softmax(top, dim=-1)
    return -(q * q.log()).sum(-1) / math.log(k)


def ref_weights(
    logp,
    alpha=1.0,
    min_weight=None,
    beta=1.0,
    p_min=None,
    p_max=None,
    weight_fn=None,
    eaft_alpha=0.0,
    eaft_top_k=20,
    ce_token_ids=None,
    logits=None,
    labels=None,
):
    p = logp.exp()
    if weight_fn is not None:
        w = weight_fn(logp)
    else:
        w = p**alpha
        if min_weight is not None:
            w = torch.maximum(w, torch.full_like(w, min_weight))
        w = beta * w + (1 - beta)
    if eaft_alpha:
        w = w * ref_topk_entropy(logits, eaft_top_k) ** eaft_alpha
    if p_min is not None:
        w = torch.where(p >= p_min, w, torch.zeros_like(w))
    if p_max is not None:
        w = torch.where(p <= p_max, w, torch.zeros_like(w))
    if ce_token_ids is not None:  # plain loop over the ids: weight 1 on those targets
        for i in ce_token_ids:
            w = torch.where(labels == i, torch.ones_like(w), w)
    return w


def ref_dft_loss(
    logits,
    labels,
    *,
    ignore_index=-100,
    reduction="mean",
    num_items_in_batch=None,
    ref_logits=None,
    kl_coef=0.0,
    **weight_options,
):
    """Reference DFT loss in float64 via log_softmax + gather; python loop for 'sequence'.

    ASFT: ``+ kl_coef * sum_v q_v (log q_v - log p_v)`` with ``q = softmax(ref_logits)``.
    """
    z = logits.double()
    logp_all = F.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = labels.clone()
    safe[~valid] = 0
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    w = ref_weights(logp.detach(), logits=z.detach(), labels=safe, **weight_options)
    per = -(w * logp)
    if ref_logits is not None:
        logq = F.log_softmax(ref_logits.double(), dim=-1)
        per = per + kl_coef * (logq.exp() * (logq - logp_all)).sum(-1)
    per = per * valid.double()
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if reduction == "mean":
        n = valid.sum().item() if num_items_in_batch is None else float(num_items_in_batch)
        return per.sum() / max(n, 1)
    if reduction == "sequence":
        flat = per.reshape(-1, per.shape[-1])
        fvalid = valid.reshape(-1, valid.shape[-1])
        seq_means = [flat[i].sum() / fvalid[i].sum() for i in range(flat.shape[0]) if fvalid[i].any()]
        n = len(seq_means) if num_items_in_batch is None else float(num_items_in_batch)
        if not seq_means:
            return per.sum() * 0.0
        return torch.stack(seq_means).sum() / max(n, 1)
    raise ValueError(reduction)


def ref_transform(logits, logit_scale=1.0, softcap=None, temperature=1.0):
    """``softcap * tanh(logit_scale * z / softcap) / temperature`` (no tanh without a softcap), in float64."""
    z = logits.double() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _supervised(logits, labels, ignore_index):
    """The supervised rows in float64: ``z [n, V]``, ``y [n]``, the mask over all tokens, ``log_softmax(z)`` and
    the targets' log-probabilities ``[n]``."""
    z = logits.double().reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    valid = y != ignore_index
    z, y = z[valid], y[valid]
    logp_all = F.log_softmax(z, -1)
    return z, y, valid, logp_all, logp_all[torch.arange(len(y)), y]


def ref_stat_sums(logits, labels, ref_logits=None, ignore_index=-100):
    """The sums of ``dft.TokenStats`` in its field order, over the supervised tokens, in float64: sum of
    ``-log p``, sum of ``p``, argmax hits, sum of entropies, sum of ``KL(softmax(ref_logits) || softmax(logits))``
    (0 without ``ref_logits``), the number of tokens, the number with ``p < 0.01``."""
    z, y, valid, logp_all, logp = _supervised(logits, labels, ignore_index)
    probs = logp_all.exp()
    kl = torch.zeros((), dtype=torch.float64)
    if ref_logits is not None:
        logq = F.log_softmax(ref_logits.double().reshape(-1, logits.shape[-1])[valid], -1)
        kl = (logq.exp() * (logq - logp_all)).sum()
    p = logp.exp()
    return torch.stack(
        [
            (-logp).sum(),
            p.sum(),
            (z.argmax(-1) == y).sum().double(),
            -(probs * logp_all).sum(),
            kl,
            torch.tensor(float(len(y)), dtype=torch.float64),
            (p < 0.01).sum().double(),
        ]
    )


def ref_stats(logits, labels, ignore_index=-100):
    z, y, valid, logp_all, logp = _supervised(logits, labels, ignore_index)
    probs = logp_all.exp()
    entropy = -(probs * logp_all).sum(-1)
    n = max(len(y), 1)
    return {
        "ce": (-logp).sum().item() / n,
        "mean_p": logp.exp().sum().item() / n,
        "token_accuracy": (z.argmax(-1) == y).sum().item() / n,
        "entropy": entropy.sum().item() / n,
    }


def make_batch(shape, vocab, *, ignore_frac=0.2, dtype=torch.float64, scale=2.0, boost=10.0, generator=None):
    """Random logits [*shape, V] and labels [*shape] with about ignore_frac of them ignored (-100).

    The target logit gets a uniform bump in [0, boost) so that target probabilities spread over (0, 1)
    (thresholds, floors and powers all bite) instead of all being ~1/V.
    """
    logits = torch.randn(*shape, vocab, dtype=torch.float64, generator=generator) * scale
    labels = torch.randint(0, vocab, shape, generator=generator)
    bump = torch.rand(shape, dtype=torch.float64, generator=generator) * boost
    logits.scatter_add_(-1, labels.unsqueeze(-1), bump.unsqueeze(-1))
    mask = torch.rand(shape, generator=generator) < ignore_frac
    labels[mask] = -100
    return logits.to(dtype), labels


def ref_nft_loss(logits, labels, old_logp, rhat, accepted, *, neg_weight=1.0, clamp_negative=1.0, max_log_ratio=10.0,
                 rhat_min=0.02, rhat_max=0.98, dft_positive=False, token_weights=None, ignore_index=-100):  # fmt: skip
    """NFT as the official code (NVlabs/NFT dp_actor.py, token ratios) writes it, in float64 with autograd:
    ``R = exp(clamp(log pi - log pi_old, max=10))``; accepted ``-log R``; rejected ``-log st((1 - r R) / (1 - r))``
    with ``st(x) = x + (clamp(x, min=eps) - x).detach()``; both times ``(1 - r)``; a token mean over the supervised
    tokens (data weights multiply, weight-0 tokens are not counted)."""
    valid = labels != ignore_index
    if token_weights is not None:
        valid = valid & (token_weights != 0)
    logp_all = F.log_softmax(logits.double(), dim=-1)
    logp = logp_all.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    log_ratio = torch.clamp(logp - old_logp.double(), max=max_log_ratio)
    ratio = log_ratio.exp()
    r = rhat.double().clamp(rhat_min, rhat_max)
    pos_loss = -log_ratio
    if dft_positive:
        pos_loss = pos_loss * logp.detach().exp()
    x = (1 - r * ratio) / (1 - r)
    st = x + (torch.clamp(x, min=clamp_negative) - x).detach()
    neg_loss = -neg_weight * torch.log(st)
    token = (1 - r) * torch.where(accepted.bool(), pos_loss, neg_loss)
    if token_weights is not None:
        token = token * token_weights.double()
    token = torch.where(valid, token, torch.zeros_like(token))
    return token.sum() / valid.sum().clamp_min(1)
