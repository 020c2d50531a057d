"""The driver: MENTOR / GRPO training loop over a worker group (single controller).

``fit()`` reads like Algorithm 1 + Eq. 9-11 of the paper: per step, sample prompts; draw N_on on-policy rollouts;
if alpha > 0, draw N_mix mixed-policy rollouts (speculative, exact) with the entropy threshold gamma_p; reward all
in the reward pool while the actor scores old log-probs and entropies (gamma_p for the next step comes from these
entropies); compute advantages (``grpo`` or ``mixed_grpo``); one PPO update over all responses; log; validate.

The paper's baselines run in the same loop: ``luffy`` (the group is N_on - 1 on-policy rollouts + the prompt's
expert solution; A = R - group mean; shaped loss on expert tokens, in the actor) and QuestA
(``algorithm.questa.enable``: training prompts carry a hint, the first p% of the expert solution; validation
never does).

Shapes: P prompts per step, N_on + N_mix responses per prompt, B = P (N_on + N_mix) rows, Lp/Lr prompt/response.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mentor.config.schema import MentorRunConfig
from mentor.config.validate import load_default_tools, to_yaml
from mentor.data.dataset import ResumableSampler, RLDataset
from mentor.data.questa import hinted_items
from mentor.models.loader import load_tokenizer
from mentor.protocol import Batch, loss_mask
from mentor.rewards.inputs import build_reward_inputs, generation_eos_ids, place_on_last_token
from mentor.rewards.pool import RewardPool, RewardStats
from mentor.single_controller import WorkerDiedError
from mentor import algos
from mentor.algos import Estimator
from mentor.trainer.metrics import rollout_metrics, validation_metrics
from mentor.utils import checkpoint as ckpt
from mentor.utils.rng import capture_rng_state, restore_rng_state
from mentor.utils.timing import timer
from mentor.utils.tracking import Tracker
from mentor.workers.rollout.base import SamplingParams
from mentor.workers.rollout.request import Phase, RolloutRequest, RolloutStats

logger = logging.getLogger(__name__)


def checkpoint_dir(config: MentorRunConfig) -> str:
    """Where the run's checkpoints go: ``trainer.save_dir``, else ``<trainer.output_dir>/checkpoints``."""
    return config.trainer.save_dir or os.path.join(config.trainer.output_dir, "checkpoints")


class RayTrainer:
    """Owns the validated config, the data, the reward pool, the tracker and the worker group."""

    def __init__(self, config: MentorRunConfig, worker_group: Any) -> None:
        self.config = c = config
        self.wg = worker_group
        self.tokenizer = load_tokenizer(c.worker.actor.model_path)
        self.eos_ids = generation_eos_ids(self.tokenizer, c.worker.actor.model_path)  # rewards: ended_with_eos
        d = c.data
        kw = dataset_kwargs(c)
        a = c.algorithm
        self.luffy = c.derived.estimator is Estimator.LUFFY
        self.questa = a.questa.enable
        self.train_set = RLDataset(d.train_files, self.tokenizer, solution_key=d.solution_key,
                                   require_solution=self.luffy or self.questa, **kw)
        self.val_set = RLDataset(d.val_files, self.tokenizer, max_samples=d.max_val_samples, **kw)
        self.sampler = ResumableSampler(len(self.train_set), d.rollout_batch_size, d.shuffle, d.seed)
        steps = self.sampler.batches_per_epoch * c.trainer.total_epochs
        self.total_steps = min(steps, c.trainer.max_steps) if c.trainer.max_steps else steps
        self.questa_switch = a.questa.switch_step or max(self.total_steps // 2, 1)
        self.reward_pool = make_reward_pool(c)
        self.mentor = c.derived.mixed
        self.reward_range = c.derived.reward_range  # R_range of Eq. 11, set by config.validate
        self.gamma: float | None = None  # gamma_p measured on the most recent batch the actor scored
        self.global_step = 0
        self.val_history: list[dict[str, Any]] = []
        self.stop_signal: int | None = None
        os.makedirs(c.trainer.output_dir, exist_ok=True)
        with open(os.path.join(c.trainer.output_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(c))
        self.save_dir = checkpoint_dir(c)
        self.resume_path = ckpt.resolve_resume(c.trainer.resume, self.save_dir)
        self.resume_state = ckpt.load_driver_state(self.resume_path) if self.resume_path else None
        tracked = (self.resume_state or {}).get("tracker", {})
        self.tracker = Tracker(c.trainer.logger, c.trainer.project_name, c.trainer.experiment_name,
                               c.trainer.output_dir, config=_flat_config(c), mode=c.trainer.swanlab_mode,
                               resume_lines=tracked.get("metrics_lines"), swanlab_run_id=tracked.get("swanlab_run_id"))

    # ---- the loop ------------------------------------------------------------------------------------------

    def init_workers(self) -> None:
        self.wg.init_model(self.total_steps)
        if self.resume_path:
            self.wg.load_checkpoint(self.resume_path)
            self._restore(self.resume_state)
            logger.info("resumed from %s at step %d", self.resume_path, self.global_step)

    def fit(self) -> dict[str, Any]:
        """Train up to ``total_steps``; returns the last step's metrics and the validation history."""
        c = self.config
        with _StopOnSignal(self) if c.trainer.save_on_signal else contextlib.nullcontext():
            try:
                metrics = self._train_loop()
            except WorkerDiedError as err:
                raise TrainingAborted(f"{err}. {self._last_good()}") from err
            finally:
                self.tracker.finish()
                self.reward_pool.close()
                self.stop_sandbox()
        if self.stop_signal is not None:
            logger.warning("stopped by signal %d after step %d; %s", self.stop_signal, self.global_step,
                           self._last_good())
        return {"last": metrics, "val_history": self.val_history}

    def _train_loop(self) -> dict[str, Any]:
        c = self.config
        if c.trainer.val_before_train and self.global_step == 0:
            val = self.validate()
            self.tracker.log(val, step=0)
            self.val_history.append({"step": 0, **val})
        metrics: dict[str, Any] = {}
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc="train", unit="step", dynamic_ncols=True)
        while self.global_step < self.total_steps and self.stop_signal is None:
            self.global_step += 1
            metrics = self.train_step(self.global_step)
            self._validate_if_due(metrics)
            self.tracker.log(metrics, step=self.global_step)
            self._check_bad_steps(metrics)
            last = self.global_step == self.total_steps
            if (c.trainer.save_freq > 0 and (self.global_step % c.trainer.save_freq == 0 or last)) \
                    or self.stop_signal is not None:
                self.save_checkpoint()
            bar.update(1)
        bar.close()
        return metrics

    def _validate_if_due(self, metrics: dict[str, Any]) -> None:
        c = self.config
        last = self.global_step == self.total_steps
        if c.trainer.val_freq > 0 and (self.global_step % c.trainer.val_freq == 0 or last):
            val = self.validate()
            metrics.update(val)
            self.val_history.append({"step": self.global_step, **val})

    def _check_bad_steps(self, metrics: dict[str, Any]) -> None:
        check_bad_steps(metrics, self.config.trainer.max_consecutive_bad_steps, self._last_good())

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def _last_good(self) -> str:
        path = ckpt.find_latest_checkpoint(self.save_dir)
        if path is None:
            return f"No checkpoint was written in {self.save_dir}."
        return f"Last good checkpoint: {path} (rerun with trainer.resume=auto to continue from it)."

    def save_checkpoint(self) -> str:
        """Atomic checkpoint of the whole run at ``global_step`` (see mentor/utils/checkpoint.py for the order)."""
        step = self.global_step
        tmp = ckpt.begin_checkpoint(self.save_dir, step)
        self.wg.save_checkpoint(tmp)
        if self.config.trainer.save_hf_model:
            self.wg.export_hf(os.path.join(tmp, "hf"))
        state = {"global_step": step, "sampler": self.sampler.state_dict(), "gamma": self.gamma,
                 "val_history": self.val_history, "rng": capture_rng_state(),
                 "tracker": {"metrics_lines": ckpt.count_lines(self.tracker.jsonl_path),
                             "swanlab_run_id": self.tracker.swanlab_run_id}}
        ckpt.save_driver_state(tmp, state)
        path = ckpt.finalize_checkpoint(self.save_dir, step)
        ckpt.rotate_checkpoints(self.save_dir, self.config.trainer.save_limit, protect=self._best_val_step())
        logger.info("checkpoint %s", path)
        return path

    def _best_val_step(self) -> set[int]:
        scored = [h for h in self.val_history if h.get("val/accuracy") is not None and h["step"] > 0]
        return {max(scored, key=lambda h: h["val/accuracy"])["step"]} if scored else set()

    def _restore(self, state: dict[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.sampler.load_state_dict(state["sampler"])
        self.gamma = state["gamma"]
        self.val_history = list(state.get("val_history", []))
        restore_rng_state(state["rng"])

    def train_step(self, step: int) -> dict[str, Any]:
        c, m = self.config, self.config.algorithm.mentor
        metrics: dict[str, Any] = {}
        with timer("step", metrics):
            prompts = self.sample_prompts(step, metrics)  # [P]
            alpha = self.alpha(step)
            with timer("sync_weights", metrics):
                self.wg.sync_rollout_weights()
            with timer("gen", metrics):
                batch = self.generate(prompts, self.n_on_policy(alpha), Phase.ON_POLICY, step, metrics)  # [P*N_on,..]
            if self.luffy:  # one of the n rollouts per prompt is the expert's solution
                expert = self.generate(prompts, 1, Phase.EXPERT, step, metrics)  # [P, ...]
                batch = self.group_by_prompt(Batch.concat([batch, expert]))  # [P*n, ...]
            if self.mentor and alpha > 0:
                with timer("gen_mixed", metrics):
                    gamma = self.gamma_for_step(batch, step)
                    mixed = self.generate(prompts, m.n_mix, Phase.MIXED, step, metrics, gamma=gamma)  # [P*N_mix, ...]
                batch = self.group_by_prompt(Batch.concat([batch, mixed]))  # [P*(N_on+N_mix), ...]
                metrics.update({"mentor/alpha": alpha, "mentor/gamma": gamma})
            elif self.mentor:
                metrics.update({"mentor/alpha": 0.0})
            batch = self.score(batch, metrics)
            if c.derived.use_reference:
                with timer("ref", metrics):
                    batch = batch.union(self.wg.compute_ref_log_probs(batch))
            with timer("adv", metrics):
                self.compute_advantages(batch, alpha)
            with timer("update_actor", metrics):
                metrics.update(_mean_over_ranks(self.wg.update_actor(batch)))
        metrics.update(rollout_metrics(batch, m.reasoning_words))
        metrics["training/global_step"] = step
        metrics["training/epoch"] = self.sampler.epoch
        return metrics

    # ---- phases --------------------------------------------------------------------------------------------

    def n_on_policy(self, alpha: float) -> int:
        c, m = self.config, self.config.algorithm.mentor
        return algos.rollouts_per_prompt(c.worker.rollout.n, m.n_mix, c.derived.estimator, alpha,
                                         m.after_alpha_zero).on_policy

    def sample_prompts(self, step: int = 1, metrics: dict[str, Any] | None = None) -> Batch:
        """The next P prompts: non-tensors ``prompt_ids``, ``ground_truth``, ``data_source``, ``uid`` (and
        ``solution_ids`` for LUFFY). With QuestA the prompts carry this step's hint."""
        items = [self.train_set[i] for i in self.sampler.next_batch()]
        if self.questa:
            q = self.config.algorithm.questa
            ratio = algos.hint_ratio_schedule(step, q.hint_ratio, q.final_ratio, self.questa_switch, q.schedule)
            items, stats = hinted_items(items, ratio, self.train_set.encode, self.config.data.max_prompt_length,
                                        q.min_hint_chars)
            if metrics is not None:
                metrics.update(stats)
        batch = _prompt_batch(items)
        if self.luffy:
            batch["solution_ids"] = [self.tokenizer(i.solution, add_special_tokens=False)["input_ids"] for i in items]
        return batch

    def generate(self, prompts: Batch, n: int, phase: Phase, step: int, metrics: dict | None = None,
                 gamma: float | None = None, temperature: float | None = None) -> Batch:
        """n responses per prompt (rows interleaved: prompt 0's n rows, then prompt 1's ...): the prompts'
        non-tensors, the sequence tensors, ``response_text``, and ``is_mixed`` / ``is_expert`` [B]."""
        rep = prompts.repeat(n, interleave=True)
        out, per_rank = self.wg.generate(rep, self.rollout_request(phase, step, gamma, temperature))
        if metrics is not None:
            metrics.update(RolloutStats.merge(per_rank).metrics())
        out = rep.union(out)
        out["is_mixed"] = torch.full((len(out),), phase is Phase.MIXED, dtype=torch.bool)
        out["is_expert"] = torch.full((len(out),), phase is Phase.EXPERT, dtype=torch.bool)
        return out

    def sandbox_url(self) -> str:
        """The tool sandbox of multi-turn rollouts: ``worker.rollout.multi_turn.sandbox_url``, or a server this
        driver starts on 127.0.0.1 at first use and stops when ``fit`` ends (or at exit, crash included)."""
        mt = self.config.worker.rollout.multi_turn
        if mt.sandbox_url:
            return mt.sandbox_url
        if getattr(self, "_sandbox", None) is None:
            from mentor.tools.sandbox_client import LocalSandbox

            self._sandbox = LocalSandbox().start()
            logger.info("tool sandbox at %s", self._sandbox.url)
        return self._sandbox.url

    def stop_sandbox(self) -> None:
        box, self._sandbox = getattr(self, "_sandbox", None), None
        if box is not None:
            box.stop()

    def rollout_request(self, phase: Phase, step: int, gamma: float | None = None,
                        temperature: float | None = None) -> RolloutRequest:
        """The sampling settings of ``phase`` from ``worker.rollout`` (validation: ``worker.rollout.val.top_p``, no
        top-k); ``temperature`` overrides ``worker.rollout.temperature``."""
        ro, phase = self.config.worker.rollout, Phase(phase)
        val = phase.is_validation
        sampling = SamplingParams(max_new_tokens=self.config.data.max_response_length,
                                  temperature=ro.temperature if temperature is None else temperature,
                                  top_p=ro.val.top_p if val else ro.top_p, top_k=-1 if val else ro.top_k)
        url = self.sandbox_url() if ro.multi_turn.enable else None
        return RolloutRequest(phase, step, sampling, gamma, sandbox_url=url)

    @staticmethod
    def group_by_prompt(batch: Batch) -> Batch:
        """Stable reorder so that each prompt's rollouts are adjacent (on-policy first, then mixed)."""
        uids = list(batch["uid"])
        first = {u: i for i, u in reversed(list(enumerate(uids)))}
        order = sorted(range(len(uids)), key=lambda i: (first[uids[i]], i))
        return batch.index(order)

    def alpha(self, step: int) -> float:
        """alpha of training step ``step`` (1-based) = schedule(step - 1): step 1 has alpha0. The official code uses
        schedule(step), one step earlier on the same curve (README, deviations)."""
        m = self.config.algorithm.mentor
        return algos.alpha_schedule(step - 1, m.alpha0, m.alpha_steps, m.alpha_schedule)

    def gamma_for_step(self, on_policy: Batch, step: int) -> float:
        """gamma_p for this step's mixed rollouts (see ``algorithm.mentor.gamma.source``)."""
        g = self.config.algorithm.mentor.gamma
        if g.source == "fixed" or (g.source == "paper" and self.gamma is None):
            return g.initial
        if self.gamma is None:  # step 1: score this step's on-policy rollouts first
            self.update_gamma(on_policy.union(self.wg.compute_log_probs(on_policy)))
        return self.gamma

    def update_gamma(self, scored: Batch) -> None:
        """gamma_p from the entropies of ``scored`` (rows per ``gamma.rows``; >= GAMMA_MIN, see algos/gamma.py)."""
        g = self.config.algorithm.mentor.gamma
        self.gamma = algos.measure_gamma(scored["entropies"], loss_mask(scored), scored["is_mixed"],
                                         g.percentile, g.floor, g.rows, scored["is_expert"])

    def score(self, batch: Batch, metrics: dict[str, Any]) -> Batch:
        """Rewards and old log-probs of ``batch``, overlapped: the reward pool scores the responses in the
        background while the actor computes ``old_log_probs`` / ``entropies`` [B, Lr] (and gamma_p for the next
        step from them). Timers: ``old_log_prob``, then ``reward`` = the scoring time left after it."""
        pending = self.reward_pool.submit(build_reward_inputs(list(batch["response_text"]), batch, self.eos_ids))
        with timer("old_log_prob", metrics):
            batch = batch.union(self.wg.compute_log_probs(batch))
            self.update_gamma(batch)
            if self.mentor:
                metrics["mentor/gamma_next"] = self.gamma
        with timer("reward", metrics):
            self.place_rewards(batch, *pending.result(), metrics)
        return batch

    def place_rewards(self, batch: Batch, scores: list[dict[str, float]], stats: RewardStats,
                      metrics: dict[str, Any]) -> None:
        """The reward pool's ``scores`` (one dict per row) placed on each response's last token:
        ``token_level_scores`` = ``token_level_rewards`` [B, Lr], and ``reward_<key>`` [B] per sub-score."""
        overall = torch.tensor([s["overall"] for s in scores], dtype=torch.float32)
        token_scores = place_on_last_token(overall, loss_mask(batch))  # [B, Lr] last model-sampled token
        batch["token_level_scores"] = token_scores
        batch["token_level_rewards"] = token_scores
        for key in _score_keys(scores):  # overall, accuracy, format + the reward's own sub-scores (tool_match, ...)
            batch[f"reward_{key}"] = torch.tensor([float(s.get(key, 0.0)) for s in scores])
        metrics.update(stats.as_metrics())

    def compute_advantages(self, batch: Batch, alpha: float) -> None:
        c = self.config
        rewards, mask, index = batch["token_level_rewards"], loss_mask(batch), batch["uid"]
        if self.mentor and bool(batch["is_mixed"].any()):
            adv, ret = algos.compute_mixed_grpo_advantage(
                rewards, mask, index, batch["is_mixed"], alpha, self.reward_range, c.algorithm.norm_eps)
        elif self.luffy:
            adv, ret = algos.compute_luffy_advantage(rewards, mask, index)
        else:
            adv, ret = algos.compute_grpo_outcome_advantage(rewards, mask, index, c.algorithm.norm_eps)
        batch["advantages"], batch["returns"] = adv, ret

    # ---- validation ----------------------------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Greedy pass@1, and avg@k / unbiased pass@k at ``worker.rollout.val.temperature``, per data source."""
        results, prompts, rollout = self.validation_results()
        # multi-turn: turns / calls per response, tool error rates of the sampled responses (val/tool/...)
        return {**validation_metrics(results, prompts, self.config.worker.rollout.val.n),
                **{f"val/{k}": v for k, v in rollout["sampled"].items()}}

    def validation_results(self) -> tuple[dict[str, dict[str, np.ndarray]], Batch, dict[str, dict[str, float]]]:
        """The validation passes over ``val_set``: (scores, prompts, rollout metrics).

        scores: ``{"greedy": {sub-score: [P]}}`` (when ``worker.rollout.val.greedy``) and ``{"sampled": {sub-score:
        [P x n]}}`` (n = ``worker.rollout.val.n``, each prompt's n rows adjacent); prompts: the P prompts' batch;
        rollout metrics: each pass's engine metrics (the tool loop's ``tool/turns_per_response`` ...)."""
        ro = self.config.worker.rollout
        prompts = _prompt_batch(self.val_set.items)
        self.wg.sync_rollout_weights()
        results: dict[str, Any] = {}
        rollout: dict[str, dict[str, float]] = {"greedy": {}, "sampled": {}}
        if ro.val.greedy:
            greedy = self.generate(prompts, 1, Phase.VAL_GREEDY, self.global_step, rollout["greedy"], temperature=0.0)
            results["greedy"] = self._val_scores(greedy)
        sampled = self.generate(prompts, ro.val.n, Phase.VAL_SAMPLE, self.global_step, rollout["sampled"],
                                temperature=ro.val.temperature)
        results["sampled"] = self._val_scores(sampled)
        return results, prompts, rollout

    def _val_scores(self, batch: Batch) -> dict[str, np.ndarray]:
        scores, _ = self.reward_pool.score(build_reward_inputs(list(batch["response_text"]), batch, self.eos_ids))
        out = {key: np.array([s.get(key, 0.0) for s in scores], dtype=float) for key in _score_keys(scores)}
        out["length"] = batch["response_mask"].sum(-1).numpy().astype(float)
        return out


def dataset_kwargs(c: MentorRunConfig) -> dict[str, Any]:
    """RLDataset arguments shared by the training and validation sets (``data.*``, the ``data.tools_file`` tools)."""
    d = c.data
    return dict(prompt_key=d.prompt_key, answer_key=d.answer_key, data_source_key=d.data_source_key,
                format_prompt=d.format_prompt, system_prompt=d.system_prompt, max_prompt_length=d.max_prompt_length,
                filter_overlong_prompts=d.filter_overlong_prompts, default_tools=load_default_tools(c))


def make_reward_pool(c: MentorRunConfig) -> RewardPool:
    """The reward pool of ``worker.reward``."""
    rw = c.worker.reward
    return RewardPool(rw.reward_function, num_workers=rw.num_workers, timeout_s=rw.timeout_s, **rw.reward_kwargs)


class TrainingAborted(RuntimeError):
    """Training cannot go on; the message says why and names the last good checkpoint."""


def check_bad_steps(metrics: dict[str, Any], limit: int, last_good: str) -> None:
    """Abort once ``limit`` optimizer steps in a row were skipped for a non-finite loss or grad norm."""
    bad = int(metrics.get("actor/consecutive_bad_steps", 0))
    if limit > 0 and bad >= limit:
        raise TrainingAborted(f"{bad} optimizer steps in a row had a non-finite loss or grad norm (limit "
                              f"trainer.max_consecutive_bad_steps={limit}); check the learning rate and data. "
                              f"{last_good}")


class _StopOnSignal:
    """SIGTERM/SIGINT -> finish the current step, checkpoint, stop. A second SIGINT interrupts at once."""

    def __init__(self, trainer: RayTrainer) -> None:
        self.trainer, self.previous = trainer, {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.trainer.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.trainer.stop_signal = signum
        logger.warning("signal %d: stopping after this step with a checkpoint (Ctrl-C again to abort now)", signum)

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _prompt_batch(items: list) -> Batch:
    """Non-tensors ``prompt_ids``, ``ground_truth``, ``data_source``, ``uid``; with any tool-use row also
    ``func_schemas``, ``env``, ``tool_calls_used`` (None on rows without tools)."""
    columns = {"prompt_ids": [i.prompt_ids for i in items], "ground_truth": [i.ground_truth for i in items],
               "data_source": [i.data_source for i in items], "uid": [i.uid for i in items]}
    if any(i.has_tools for i in items):
        from mentor.data.dataset import TOOL_KEYS

        for key in TOOL_KEYS:
            columns[key] = [getattr(i, key) for i in items]
    return Batch(non_tensors=columns)


def _score_keys(scores: list[dict[str, float]]) -> list[str]:
    """``overall``, ``accuracy``, ``format`` and every other sub-score the reward returned (the pool gives all
    items the same keys)."""
    return list(dict.fromkeys(["overall", "accuracy", "format", *(scores[0] if scores else {})]))


def _mean_over_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    keys = per_rank[0].keys()
    return {k: float(np.mean([r[k] for r in per_rank])) for k in keys}


def _flat_config(c: MentorRunConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(c), resolve=True)
