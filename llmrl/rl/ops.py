"""Masked reductions, whitening, log-probabilities, entropy and KL estimators. Imports only torch."""
from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the positions where ``mask`` is 1."""
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1.

    ``num_tokens`` replaces the denominator: a microbatch of a larger minibatch passes the minibatch's
    token count, so that summing the microbatch losses gives exactly the minibatch's token mean.
    """
    denom = mask.sum() if num_tokens is None else num_tokens
    return (x * mask).sum() / denom


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (Bessel-corrected when ``unbiased``)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"masked_var needs at least 2 unmasked values for an unbiased estimate, got {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to unit variance over the masked positions; zero mean too when ``shift_mean``.

    Masked-out positions are returned as 0 so that they cannot leak into a later sum.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at ``tokens``, without keeping a (B, T, V) log-softmax copy.

    logits: (B, T, V); tokens: (B, T) -> (B, T). Dividing by the sampling temperature makes these the
    log-probabilities of the distribution the tokens were actually sampled from (Huang et al. 2024, detail 3).
    """
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at each position: (B, T, V) -> (B, T)."""
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = torch.exp(logits - logz)
    return (logz.squeeze(-1) - (probs * logits).sum(-1))


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating KL").

    k1 = log r with log r = log pi - log pi_ref: unbiased, can be negative per token.
    k2 = (log r)^2 / 2: biased, low variance.
    k3 = (r^-1 - 1) + log r: unbiased and never negative.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use 'k1', 'k2' or 'k3'")


class RunningMeanStd:
    """Mean and standard deviation of every value seen so far, updated a batch at a time (Chan et al. 1979)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        self.update_moments(masked_moments(x, torch.ones_like(x)))

    def update_moments(self, moments: torch.Tensor) -> None:
        """Adds a batch given as ``masked_moments`` (which may be summed over ranks: every rank then holds
        the statistics of all)."""
        n, batch_mean, batch_m2 = moments_stats(moments)
        if n == 0:
            return
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count > 0 else 1.0

    def normalize(self, x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return (x - self.mean) / (self.std + eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(3,) [sum, sum of squares, count] over the masked positions: summable across data-parallel ranks."""
    x = x.double()
    return torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.double().sum()])


def moments_stats(moments: torch.Tensor) -> tuple[int, float, float]:
    """(count, mean, sum of squared deviations from the mean) of ``masked_moments``' [sum, squares, count]."""
    total, total_sq, n = moments.tolist()
    if n == 0:
        return 0, 0.0, 0.0
    mean = total / n
    return int(n), mean, max(total_sq - n * mean * mean, 0.0)


def whiten_with_moments(x: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor, shift_mean: bool = True,
                        eps: float = 1e-8) -> torch.Tensor:
    """``masked_whiten`` with the mean and (Bessel-corrected) variance taken from ``moments``, which may
    come from all ranks: whitening over the global batch, whatever its split into ranks."""
    total, total_sq, n = moments.tolist()
    if n < 2:
        raise ValueError(f"whitening needs at least 2 unmasked values, got {int(n)}")
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0) * n / (n - 1)
    whitened = (x - mean) * (var + eps) ** -0.5
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask
