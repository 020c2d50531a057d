"""The typed rollout request/stats between driver and workers, and the reward / old-log-prob overlap of a step."""

import pickle
import threading
from concurrent.futures import Future

import pytest
import torch

from mentor.algos import Estimator
from mentor.config.schema import MentorRunConfig
from mentor.protocol import Batch
from mentor.rewards.pool import RewardStats
from mentor.trainer.ray_trainer import RayTrainer
from mentor.workers.fsdp_worker import sampling_seed
from mentor.workers.rollout.base import SamplingParams
from mentor.workers.rollout.request import Phase, RolloutRequest, RolloutStats

PARAMS = SamplingParams(16, temperature=0.6, top_p=0.9, top_k=5)


# ---- request and stats ----------------------------------------------------------------------------------------


def test_request_and_stats_survive_pickling_as_ray_sends_them():
    request = RolloutRequest("mixed", 3, PARAMS, gamma=0.4)
    assert request.phase is Phase.MIXED  # the phase string was converted once
    back = pickle.loads(pickle.dumps(request))
    assert back == request and back.phase is Phase.MIXED and back.sampling == PARAMS
    stats = RolloutStats(Phase.EXPERT, 4, {"rows_cut": 1.0})
    assert pickle.loads(pickle.dumps(stats)) == stats


def test_request_rejects_a_bad_phase_and_misplaced_gamma():
    with pytest.raises(ValueError, match="'off' is not one of on, mixed, expert, val_greedy, val_sample"):
        RolloutRequest("off", 1, PARAMS)
    with pytest.raises(ValueError, match="phase 'mixed' needs an entropy threshold gamma > 0"):
        RolloutRequest(Phase.MIXED, 1, PARAMS)
    with pytest.raises(ValueError, match="only used by phase 'mixed', not 'on'"):
        RolloutRequest(Phase.ON_POLICY, 1, PARAMS, gamma=0.5)
    with pytest.raises(TypeError, match="must be a SamplingParams"):
        RolloutRequest(Phase.ON_POLICY, 1, {"temperature": 1.0})


def test_stats_add_over_ranks_into_the_mentor_rates():
    ranks = [RolloutStats(Phase.MIXED, 2, {"tokens_emitted": 10.0, "drafts_proposed": 8.0, "drafts_accepted": 6.0,
                                           "w_sum": 2.0, "tokens_guided": 3.0, "expert_row_passes": 4.0}),
             RolloutStats(Phase.MIXED, 2, {"tokens_emitted": 30.0, "drafts_proposed": 12.0, "drafts_accepted": 9.0,
                                           "w_sum": 6.0, "tokens_guided": 5.0, "expert_row_passes": 6.0})]
    total = RolloutStats.merge(ranks)
    assert total.rows == 4 and total.counters["tokens_emitted"] == 40.0
    # accept 15 / 20; w 8 / 40 tokens; guided 8 / 40; expert passes 10 / 40
    assert total.metrics() == {"mentor/accept_rate": 0.75, "mentor/mean_w": 0.2, "mentor/guided_frac": 0.2,
                               "mentor/expert_passes_per_token": 0.25}
    assert RolloutStats(Phase.EXPERT, 3, {"rows_cut": 2.0}).metrics() == {"luffy/expert_rows_cut": 2.0}
    assert RolloutStats(Phase.ON_POLICY, 3, {"tokens_emitted": 9.0}).metrics() == {}
    with pytest.raises(ValueError, match="different phases"):
        RolloutStats.merge([ranks[0], RolloutStats(Phase.ON_POLICY, 1)])


def test_sampling_seeds_keep_their_numbers_so_old_runs_resume_alike():
    # 1 * 1_000_003 + 2 * 10_007 + 3 * 101 + phase id (on 1, mixed 2, val_greedy 3, val_sample 4, expert 5)
    assert [sampling_seed(1, 2, 3, p) for p in ("on", "mixed", "val_greedy", "val_sample", "expert")] == \
        [1_020_321, 1_020_322, 1_020_323, 1_020_324, 1_020_325]
    assert sampling_seed(1, 2, 3, Phase.MIXED) == sampling_seed(1, 2, 3, "mixed")


def test_estimator_members_equal_their_config_strings():
    assert Estimator("mixed_grpo") is Estimator.MIXED_GRPO and Estimator.LUFFY == "luffy"
    assert [e.value for e in Estimator] == ["grpo", "mixed_grpo", "luffy"]


# ---- the driver side, with fake worker groups ------------------------------------------------------------------


def _trainer(wg, pool=None) -> RayTrainer:
    """A RayTrainer without data, Ray or models: only what generate / score read."""
    trainer = RayTrainer.__new__(RayTrainer)
    trainer.config, trainer.wg, trainer.reward_pool = MentorRunConfig(), wg, pool
    trainer.config.data.max_response_length = 3
    trainer.mentor, trainer.gamma, trainer.eos_ids = True, None, [2]
    return trainer


def _rollouts(b: int = 4) -> Batch:
    """B = 4 rows, Lp = 2, Lr = 3; rows 0-1 end with eos (2)."""
    responses = torch.tensor([[5, 2, 0], [6, 7, 2], [5, 6, 7], [7, 0, 0]])[:b]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]])[:b]
    return Batch(tensors={"responses": responses, "response_mask": mask,
                          "attention_mask": torch.cat([torch.ones(b, 2, dtype=torch.long), mask], 1),
                          "is_mixed": torch.zeros(b, dtype=torch.bool), "is_expert": torch.zeros(b, dtype=torch.bool)},
                 non_tensors={"response_text": [f"text {i}" for i in range(b)], "uid": ["a", "a", "b", "b"][:b],
                              "ground_truth": ["1"] * b, "data_source": ["math"] * b})


class _GenerateGroup:
    """Two ranks: each returns its half of the rows and its own counters."""

    def __init__(self):
        self.requests = []

    def generate(self, prompts, request):
        self.requests.append(request)
        out = _rollouts(len(prompts)).select(["responses", "response_mask", "attention_mask", "response_text"])
        half = RolloutStats(request.phase, len(prompts) // 2, {"tokens_emitted": 4.0, "drafts_proposed": 4.0,
                                                                "drafts_accepted": 3.0})
        return out, [half, half]


def test_generate_sends_a_request_and_merges_the_ranks_stats():
    wg = _GenerateGroup()
    trainer = _trainer(wg)
    prompts = Batch(non_tensors={"prompt_ids": [[1, 2], [3, 4]], "uid": ["a", "b"]})
    metrics = {}
    out = trainer.generate(prompts, 2, Phase.MIXED, 7, metrics, gamma=0.3)
    req = wg.requests[0]
    assert (req.phase, req.step, req.gamma, req.sampling.max_new_tokens) == (Phase.MIXED, 7, 0.3, 3)
    assert list(out["uid"]) == ["a", "a", "b", "b"] and bool(out["is_mixed"].all()) and out.meta == {}
    assert metrics["mentor/accept_rate"] == 0.75  # (3 + 3) / (4 + 4)
    trainer.generate(prompts, 1, Phase.VAL_GREEDY, 7, temperature=0.0)
    val = wg.requests[1].sampling
    assert (val.temperature, val.top_k, wg.requests[1].gamma) == (0.0, -1, None)  # validation: no top-k


class _OverlapPool:
    """Scoring that can only finish while the actor is computing old log-probs: it waits for that to start."""

    def __init__(self, events):
        self.events, self.actor_busy, self.scored = events, threading.Event(), threading.Event()

    def submit(self, inputs):
        self.events.append("submit")
        future = Future()

        def run():
            if not self.actor_busy.wait(5):
                future.set_exception(AssertionError("the rewards were awaited before the log-probs started"))
                return
            self.events.append("scored")
            self.scored.set()
            future.set_result(([{"overall": float(i["ended_with_eos"]), "accuracy": 0.0, "format": 1.0}
                                for i in inputs], RewardStats()))

        threading.Thread(target=run, daemon=True).start()
        return future


class _LogProbGroup:
    def __init__(self, pool):
        self.pool = pool

    def compute_log_probs(self, batch):
        self.pool.events.append("log_probs")
        self.pool.actor_busy.set()
        assert self.pool.scored.wait(5), "the rewards were not scored while the actor worked"
        b, lr = batch["responses"].shape
        return Batch(tensors={"old_log_probs": torch.zeros(b, lr), "entropies": torch.ones(b, lr)})


def test_rewards_are_scored_while_the_actor_computes_old_log_probs():
    events = []
    pool = _OverlapPool(events)
    trainer = _trainer(_LogProbGroup(pool), pool)
    metrics = {}
    batch = trainer.score(_rollouts(), metrics)
    assert events == ["submit", "log_probs", "scored"]
    # rows 0-1 ended with eos -> overall 1 on the last response token (positions 1 and 2), rows 2-3 -> 0
    assert batch["token_level_scores"].tolist() == [[0, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert batch["reward_format"].tolist() == [1.0] * 4 and "old_log_probs" in batch
    assert trainer.gamma is not None and metrics["mentor/gamma_next"] == trainer.gamma
    assert {"timing_s/old_log_prob", "timing_s/reward", "reward/errors"} <= set(metrics)
