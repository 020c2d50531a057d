"""MENTOR's mixed policy as a vLLM model: the target of vLLM's draft-model speculative decoding.

Design (exact at every emitted position). ``MentorMixtureForCausalLM`` wraps the policy and the expert
(two ordinary vLLM models with their own KV caches) and turns their logits into the mixture
q = (1 - w) p + w s, w = min(1, H(p) / gamma) (paper Eq. 6; the math is mixed_policy.py's). vLLM
runs it as the TARGET of draft-model speculative decoding whose DRAFT is the policy (the same weight
modules as the target's policy part, see Costs) with ``draft_sample_method="probabilistic"``.
Ordinary speculative sampling is exact for its target at every position, so every response token is
distributed as q at its prefix:
- the first response token is sampled from the target's prefill logits, i.e. from q;
- a draft d ~ p_T is accepted with probability min(1, q(d) / p_T(d)), a rejection is replaced by a
  draw from normalize(max(0, q - p_T)) (paper Eq. 7-8);
- after K accepted drafts the bonus token is sampled from the target's logits at K+1, i.e. from q.
This removes both inexact spots of a patched rejection sampler (first token and bonus token from the
expert alone; see mixed_policy.py on the official code's bonus-token bias).

Temperature (checked against vllm 0.32.0's sampler and rejection sampler): vLLM applies the request's
temperature T to the draft (draft_probs = softmax(l_p / T)) and to the target (it divides the target
logits by T before softmax, for accept/recover and for the first and bonus tokens). The mixture must
mix the temperature-scaled (and top-k/top-p filtered) p and s, so the model knows T (set per
generate call) and returns T * log q: vLLM's division by T then yields softmax(log q) = q exactly.
vLLM's own top-k/top-p are switched off for mixed requests (the model applies them to p and s before
mixing, as the hf engine does); the draft then samples from the unfiltered p_T, which changes only
the acceptance rate, never the distribution (speculative sampling is exact for any draft whose
probabilities the verifier sees). T = 0 (greedy): p is one-hot, w = 0, q = p, so the model returns the
policy logits and vLLM's greedy path decodes the policy.

Runtime settings (gamma, T, top-p, top-k) live on the model and are set by the engine before every
generate call through the worker extension (vllm_adapter.py); no restart. The model also keeps, for the
logits rows of the last step, w and TV(p, q) = w TV(p, s), which the adapter's sampler hook reduces to
the emitted tokens (stats). Weights: vLLM loads the policy from the engine's model path (the
``--hf-overrides`` swap the architecture to this class) and this class loads the expert from
``mentor_mixture["expert_path"]``; weight sync reloads only the policy part (the draft shares it).

Costs. The policy's weights exist once per process: vllm_adapter.share_policy_weights makes the
draft model (and the on-policy engine view, vllm_engine.SharedOnPolicyEngine) use the modules of this
model's ``policy`` part (``shared_policy``), keeping only their attention layers (KV caches) apart;
the expert is held once. KV caches: policy, expert and draft (and the view's own). A round of K
drafts costs K draft forwards of one token plus one target forward (policy + expert) over K+1
tokens, the expert's share per emitted token being about 1 / (accepted drafts + 1), as in the hf engine.

Shapes: N tokens of a forward, R logits rows, V vocabulary, Hp / He hidden sizes of policy / expert.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mentor.workers.rollout.mixed_policy import mix_probs, process_logits
from mentor.workers.rollout.vllm_adapter import DraftHiddenStatesHook, init_inner_model

__all__ = ["MIXTURE_ARCH", "MixtureSettings", "MentorMixtureForCausalLM", "mixture_overrides", "mixture_target_logits"]

MIXTURE_ARCH = "MentorMixtureForCausalLM"


@dataclass
class MixtureSettings:
    """What the mixture needs besides the logits; set before every generate call."""

    gamma: float = math.inf
    """Entropy threshold gamma_p (nats); inf = the policy alone."""
    temperature: float = 1.0
    """The SamplingParams temperature of the call (vLLM applies it again to the returned logits)."""
    top_p: float = 1.0
    top_k: int = -1


def mixture_target_logits(policy_logits: Tensor, expert_logits: Tensor,
                          st: MixtureSettings) -> tuple[Tensor, Tensor, Tensor]:
    """Target logits whose softmax after vLLM's division by T is q.  [R, V] each -> ([R, V], w [R], tv [R]).

    Returns z = T log q (float32; -inf where q = 0), w = min(1, H(p~) / gamma) and TV(p~, q) = w TV(p~, s~),
    p~ and s~ being the processed (temperature, top-k, top-p) policy and expert distributions.
    T = 0 returns the policy logits (q = p is the policy's one-hot; vLLM takes the argmax).
    """
    if st.temperature == 0:
        zeros = policy_logits.new_zeros(policy_logits.shape[0], dtype=torch.float32)
        return policy_logits.float(), zeros, zeros
    p = process_logits(policy_logits.float(), st.temperature, st.top_p, st.top_k)  # [R, V]
    s = process_logits(expert_logits.float(), st.temperature, st.top_p, st.top_k)  # [R, V]
    q, w = mix_probs(p, s, st.gamma)  # [R, V], [R]
    tv = w * 0.5 * (s - p).abs().sum(-1)  # q - p = w (s - p)
    return st.temperature * torch.log(q), w, tv


def mixture_overrides(policy_path: str, expert_path: str) -> dict:
    """``hf_overrides`` that make a vLLM engine on ``policy_path`` load the mixture of it and the expert."""
    policy_cfg = json.loads((Path(policy_path) / "config.json").read_text())
    return {"architectures": [MIXTURE_ARCH],
            "mentor_mixture": {"expert_path": str(expert_path),
                               "policy_architectures": policy_cfg.get("architectures") or ["Qwen2ForCausalLM"]}}


def _safetensors_weights(path: str) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of every tensor in the ``*.safetensors`` files of a checkpoint directory."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors under the expert path {path}; save the expert with "
                                "save_pretrained(..., safe_serialization=True)")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


class MentorMixtureForCausalLM(DraftHiddenStatesHook, nn.Module):
    """vLLM model whose logits are T log q for the mixture q of a policy and an expert (see module doc)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from transformers import AutoConfig

        hf_config = vllm_config.model_config.hf_config
        spec = getattr(hf_config, "mentor_mixture", None)
        if not spec:
            raise ValueError(f"{MIXTURE_ARCH} needs hf_overrides['mentor_mixture'] (see mixture_overrides)")
        self.expert_path = spec["expert_path"]
        self.policy = init_inner_model(vllm_config, prefix, "policy", hf_config, spec["policy_architectures"])
        self.expert = init_inner_model(vllm_config, prefix, "expert", AutoConfig.from_pretrained(self.expert_path))
        self.policy_hidden = int(hf_config.get_text_config().hidden_size)
        self.settings = MixtureSettings()
        self.row_stats: tuple[Tensor, Tensor] | None = None  # (w [R], tv [R]) of the last compute_logits
        sched = vllm_config.scheduler_config
        self._max_tokens = sched.max_num_batched_tokens + sched.max_num_seqs * 8  # + draft slots
        self._policy_hidden_buf: Tensor | None = None  # [>= N, Hp], see draft_hidden_states

    @property
    def shared_policy(self) -> nn.Module:
        """The policy modules the draft model and the on-policy view use (vllm_adapter.share_policy_weights)."""
        return self.policy

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.policy.embed_input_ids(input_ids)

    def forward(self, input_ids: Tensor | None, positions: Tensor, intermediate_tensors=None,
                inputs_embeds: Tensor | None = None) -> Tensor:
        """Both models over the same tokens; returns [N, Hp + He] (policy hidden states first)."""
        hp = self.policy(input_ids, positions, intermediate_tensors, inputs_embeds)
        he = self.expert(input_ids, positions, intermediate_tensors, None)
        n = hp.shape[0]
        if self._policy_hidden_buf is None or self._policy_hidden_buf.shape[0] < n:
            self._policy_hidden_buf = hp.new_empty((max(n, self._max_tokens), hp.shape[1]))
        self._policy_hidden_buf[:n].copy_(hp)  # a persistent buffer: a captured CUDA graph refills it on replay
        return torch.cat([hp, he.to(hp.dtype)], dim=-1)

    def draft_hidden_states(self) -> Tensor | None:
        """The policy's part [>= N, Hp] of the last forward's hidden states, for the draft proposer's buffer
        (unused by draft models; the concatenated [N, Hp + He] width would break vLLM's copy)."""
        return self._policy_hidden_buf

    def compute_logits(self, hidden_states: Tensor) -> Tensor | None:
        """[R, Hp + He] -> [R, V] = T log q (None on tensor-parallel ranks that do not sample)."""
        hp, he = hidden_states[:, :self.policy_hidden], hidden_states[:, self.policy_hidden:]
        policy_logits = self.policy.compute_logits(hp)
        expert_logits = self.expert.compute_logits(he)
        if policy_logits is None or expert_logits is None:
            return None
        if policy_logits.shape[-1] != expert_logits.shape[-1]:
            raise ValueError(f"policy vocabulary {policy_logits.shape[-1]} != expert vocabulary "
                             f"{expert_logits.shape[-1]} ({self.expert_path}); the mixture needs one vocabulary")
        logits, w, tv = mixture_target_logits(policy_logits, expert_logits, self.settings)
        self.row_stats = (w, tv)
        return logits

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """The engine's checkpoint (the policy) goes to the policy; the expert is read from its own path."""
        loaded = {f"policy.{name}" for name in self.policy.load_weights(weights)}
        loaded |= {f"expert.{name}" for name in self.expert.load_weights(_safetensors_weights(self.expert_path))}
        return loaded
