"""Exact sequence distributions of the mixed policy over enumerable short responses (shared by the hf and vLLM
exactness tests): every prefix of a fixed prompt up to `depth` tokens, over a vocabulary of V tokens."""

import itertools

import torch

from mentor.workers.rollout.base import SamplingParams
from mentor.workers.rollout.mixed_policy import mix_probs, process_logits


def exact_joint(ps, ss, gamma: float) -> torch.Tensor:
    """prod_t q_t over all sequences: [V^depth] in row-major token order."""
    joint = torch.ones(1, dtype=torch.float64)
    for p, s in zip(ps, ss):
        q, _ = mix_probs(p, s, gamma)
        joint = (joint.unsqueeze(-1) * q).reshape(-1)
    return joint


def sequence_tools(vocab: int, prompt: list[int]):
    """(exact_dists, marginal, empirical) for responses over `vocab` tokens after `prompt`."""

    def exact_dists(policy, expert, depth: int, params: SamplingParams):
        """Policy and expert probs at every prefix up to `depth` tokens: lists of [V^d, V] (float64)."""
        ps, ss = [], []
        with torch.no_grad():
            for d in range(depth):
                suffix = torch.tensor(list(itertools.product(range(vocab), repeat=d)), dtype=torch.long)
                suffix = suffix.view(vocab ** d, d)
                ids = torch.cat([torch.tensor(prompt).expand(vocab ** d, -1), suffix], dim=1)
                for model, acc in ((policy, ps), (expert, ss)):
                    logits = model(input_ids=ids).logits[:, -1].double()
                    acc.append(process_logits(logits, params.temperature, params.top_p, params.top_k))
        return ps, ss

    def marginal(joint: torch.Tensor, depth: int, positions: list[int]) -> torch.Tensor:
        """Joint of the tokens at `positions` (consecutive) from the full joint over `depth` tokens."""
        full = joint.view([vocab] * depth)
        other = [d for d in range(depth) if d not in positions]
        return (full.sum(other) if other else full).reshape(-1)

    def empirical(responses: torch.Tensor, positions: list[int]) -> torch.Tensor:
        idx = torch.zeros(responses.shape[0], dtype=torch.long)
        for pos in positions:
            idx = idx * vocab + responses[:, pos]
        return torch.bincount(idx, minlength=vocab ** len(positions)).double() / responses.shape[0]

    return exact_dists, marginal, empirical
