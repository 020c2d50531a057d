"""The hf rollout engines: torch + HF transformers causal LMs decoding with a KV cache.

- :class:`HFRolloutEngine` samples on-policy from one model.
- :class:`HFMixedRolloutEngine` (implemented in hf_mixed.py, re-exported here) samples from MENTOR's
  mixed policy q = (1 - w) p + w s, speculatively (paper Algorithm 1) or naively.

Both feed the models left-padded prompts with explicit attention masks and position ids
(hf_state.CachedLM), so the distribution each token is drawn from equals the actor's softmax over the
`base.build_sequences` tensors at the same temperature / top-p / top-k. Batches larger than
`max_batch_size` are generated chunk by chunk, consuming the one generator in order; finished rows are
dropped from the batch as they accumulate. Models are run in eval mode under `torch.inference_mode()`
and nothing derived from their weights outlives a `generate` call.

Shapes: B rows, V vocabulary.
"""

import torch

from mentor.workers.rollout.base import RolloutOutput, SamplingParams, check_prompts, concat_outputs
from mentor.workers.rollout.hf_mixed import HFMixedRolloutEngine
from mentor.workers.rollout.hf_state import (
    CachedLM,
    ResponseBuffer,
    StepTrace,
    TraceHook,
    check_engine_args,
    compact,
    eval_mode,
    model_device,
    prefill,
)
from mentor.workers.rollout.mixed_policy import process_logits, sample_from

__all__ = ["HFMixedRolloutEngine", "HFRolloutEngine"]


class HFRolloutEngine:
    """On-policy sampling from one HF causal LM.

    Args:
        model: a transformers causal LM (e.g. Qwen2ForCausalLM); its current weights are used at each call.
        eos_token_ids: a row stops after emitting any of them (the eos is kept); [] = stop only at max_new_tokens.
        pad_token_id: fills prompts on the left and responses on the right.
        max_batch_size: rows per forward; larger batches are generated in chunks.
    Attributes:
        trace: optional hook called with a `StepTrace` at every sampling step (tests, diagnostics).
    """

    def __init__(self, model: torch.nn.Module, eos_token_ids: list[int], pad_token_id: int, max_batch_size: int = 256):
        self.model = model
        self.eos_token_ids = check_engine_args(eos_token_ids, pad_token_id, max_batch_size)
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.trace: TraceHook | None = None

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, generator: torch.Generator) -> RolloutOutput:
        """Sample one response per prompt.  Returns responses [B, Lr]; stats: tokens_emitted.

        generator: the only source of randomness, on the model's device; the same seed gives the same output.
        """
        check_prompts(prompt_ids)
        outputs = []
        with torch.inference_mode(), eval_mode(self.model):
            for start in range(0, len(prompt_ids), self.max_batch_size):
                chunk = prompt_ids[start:start + self.max_batch_size]
                outputs.append(self._generate_chunk(chunk, start, params, generator))
        # built outside inference mode, so the actor may use them in autograd (inference tensors cannot)
        out = concat_outputs(outputs, self.pad_token_id)
        out.stats.setdefault("tokens_emitted", 0.0)
        return out

    def _generate_chunk(
        self, prompts: list[list[int]], row_offset: int, params: SamplingParams, generator: torch.Generator
    ) -> RolloutOutput:
        device = model_device(self.model)
        policy = CachedLM(self.model, len(prompts), device)
        pending = prefill([policy], prompts, self.pad_token_id)  # [b] last prompt tokens
        buf = ResponseBuffer(len(prompts), params.max_new_tokens, self.eos_token_ids, self.pad_token_id, device,
                             params.row_caps(len(prompts), row_offset))
        rows = torch.arange(len(prompts), device=device)  # buffer row of each batch row
        while not buf.all_finished:
            active = ~buf.finished[rows]  # [b]
            ones = torch.ones_like(rows)
            logits = policy.forward(pending.unsqueeze(-1), active.unsqueeze(-1), last_only=True)[:, -1]  # [b, V]
            probs = process_logits(logits, params.temperature, params.top_p, params.top_k)  # [b, V]
            pending = sample_from(probs, generator)  # [b]
            if self.trace is not None:
                self.trace(StepTrace(rows[active] + row_offset, buf.length[rows[active]],
                                     probs[active].unsqueeze(1), None, ones[active]))
            buf.append(rows, pending.unsqueeze(-1), ones, active)
            rows, pending = compact(rows, buf.finished, [policy], pending)
            policy.squeeze_holes()
        return buf.output({"tokens_emitted": float(buf.length.sum())})
