"""A node's working copy: its own data (from its own binding) and its model, built once per process.

Flower's simulation engine reuses actor processes across rounds; building MiniLM and
re-reading data every round would dominate the round time, so runtimes are cached per
(node, request). Nothing here comes from a path the coordinator named: the data comes
from the node's binding for the requested task, the model from the node's own mapping
of the requested name. The cache holds no global parameters between rounds: every
round starts from the encoder the coordinator sent.
"""

from __future__ import annotations

from typing import Optional

from securefpt.errors import ConfigError, DataError, ModelUnavailableError
from securefpt.learning.data import ClientData, LabelError, load_canaries, load_examples
from securefpt.learning.modeling import AssembledModel, build_model, get_trainable, set_trainable
from securefpt.learning.training import EvalResult, TrainResult, evaluate, local_steps, train_local
from securefpt.node.budget import MAX_NOISE_TO_SIGNAL, PrivacyPlan, check_noise, noise_to_signal, plan_privacy
from securefpt.node.config import Node
from securefpt.node.personal import Personal
from securefpt.node.progress import StepProgress
from securefpt.node.state import NodeState
from securefpt.privacy.distributed import Ring, integer_scale, ring_problem, rounded_sensitivity, share_variance
from securefpt.protocol.refusals import NodeRefusal
from securefpt.protocol.request import ExperimentRequest


def _min(a: Optional[int], b: Optional[int]) -> Optional[int]:
    return b if a is None else a if b is None else min(a, b)


class NodeRuntime:
    def __init__(self, node: Node, request: ExperimentRequest) -> None:
        self.node, self.request = node, request
        binding = node.data.get(request.task)
        if binding is None:
            raise NodeRefusal("unknown-task", f"no binding for task {request.task!r}")
        self.dataset = binding.dataset or request.task  # what the lifetime budget is kept for
        if binding.labels is not None and not set(binding.labels) <= set(request.labels):
            raise NodeRefusal("labels-outside-task", "the node's declared labels are not all in the request's")
        source = node.model_source(request.model.name)
        if source is None:
            raise NodeRefusal("model-not-allowed", f"model {request.model.name!r} is not in this node's models")
        try:
            self.data: ClientData = load_examples(
                binding, binding.language or node.language, request.labels,
                _min(binding.max_train, request.training.max_train), _min(binding.max_eval, request.training.max_eval),
                request.seed, binding.label_map)
            if binding.canaries is not None:  # the institution's own audit: trained on, never evaluated
                self.data.train += load_canaries(binding.canaries, request.labels)
        except LabelError as exc:  # declared labels: a row outside them, whatever the request (constant)
            raise NodeRefusal("labels-outside-task" if binding.labels is None else "data-unavailable",
                              str(exc)) from None
        except DataError as exc:
            raise NodeRefusal("data-unavailable", str(exc)) from None
        if binding.labels is not None:
            held = {request.labels[e.label] for e in [*self.data.train, *self.data.eval]}
            if not held <= set(binding.labels):
                raise NodeRefusal("data-unavailable", "rows hold labels the node did not declare")
        try:
            model_cfg = request.model.model_copy(update={"name": source})
            self.assembled: AssembledModel = build_model(model_cfg, request.peft, len(request.labels), request.seed)
        except (ModelUnavailableError, ConfigError) as exc:  # a model or device this node cannot load
            raise NodeRefusal("model-not-allowed", str(exc)) from None
        self._plan: Optional[PrivacyPlan] = None
        self.personal = Personal(node.state_dir, request, keep=node.keep_personalized)
        self.local_head = request.personalization.local_head
        self._initial = get_trainable(self.assembled.model)  # the model's initial head, before any round

    def shared_names(self) -> list[str]:
        """The trainable parameters that travel (all of them, but the head where it stays local)."""
        return [n for n in self.assembled.trainable_names() if self.request.personalization.travels(n)]

    def _with_own_head(self, shared) -> dict:
        return {**shared, **self.personal.head(self._initial)} if self.local_head else dict(shared)

    @property
    def privacy_plan(self) -> Optional[PrivacyPlan]:
        """This node's DP plan for the experiment (None without DP); |D_k| never leaves the node."""
        if not self.request.dp.enabled:
            return None
        if self._plan is None:
            plan = plan_privacy(self.request, len(self.data.train), self.dimension)
            if not plan.distributed:  # distributed: the noise is the sum's, sized on public values only
                self._check_noise_publicly(plan)
            self._plan = plan
        return self._plan

    @property
    def dimension(self) -> int:
        return sum(self._initial[n].size for n in self.shared_names())

    def _check_noise_publicly(self, plan: PrivacyPlan) -> None:
        """Refuse noise that would swamp the signal, deciding on public values only: the plan at the
        request's row cap (a node with at least that many rows trains on exactly that many). A
        decision at the node's own |D_k| would answer one bit of it per probe; so without a cap
        the node accepts, and a plan noisier than the bound is noted in its own log only."""
        dimension = sum(a.size for a in self._initial.values())  # DP-SGD noises every trainable parameter
        cap = self.request.training.max_train
        if cap is not None:  # a node with at least `cap` rows trains on exactly `cap`: its own plan is that plan
            public = plan if cap == len(self.data.train) else plan_privacy(self.request, cap)
            check_noise(public, cap, dimension)
        own = noise_to_signal(plan, len(self.data.train), dimension)
        if own > MAX_NOISE_TO_SIGNAL:
            NodeState(self.node.state_dir).log("advisory", detail=f"noise-to-signal {own:.1f} above "
                                               f"{MAX_NOISE_TO_SIGNAL}: this node's update will be mostly noise")

    def fit(self, global_arrays, seed: int) -> tuple[dict, TrainResult]:
        """Start from the global encoder (and this node's own head, where it stays local) and train
        locally: DP-SGD (randomness from the OS) when the request asks for DP, plain epochs
        otherwise. Returns the new trainable parameters; a local head is kept here."""
        set_trainable(self.assembled.model, self._with_own_head(global_arrays))
        plan, training = self.privacy_plan, self.request.training
        if plan is None:
            progress = StepProgress(self.node.client_id, "training", local_steps(len(self.data.train), training))
            result = train_local(self.assembled, self.data.train, training, seed, on_step=progress)
        else:
            from securefpt.learning.dp_training import DPSchedule, dp_train

            progress = StepProgress(self.node.client_id, "DP-SGD training", plan.steps_per_round)
            schedule = DPSchedule(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round, plan.max_grad_norm)
            result = dp_train(self.assembled, self.data.train, training, schedule, on_step=progress)
        progress.close()
        updated = get_trainable(self.assembled.model)
        if self.local_head:
            self.personal.keep_head(updated)
        return updated, result

    def _distributed_plan(self) -> PrivacyPlan:
        plan = self.privacy_plan
        if plan is None or not plan.distributed:
            raise RuntimeError("a distributed-DP step of an experiment without distributed DP")
        return plan

    def check_ring(self, ring: Optional[Ring]) -> Ring:
        """Distributed DP: refuse a round whose public parameters cannot carry this node's share (no
        grid, too few noise shares in any sum the coordinator could unmask, a ring too small or too
        coarse: privacy/distributed.py). Decided on public values only, before anything is trained."""
        if ring is None:
            raise NodeRefusal("secagg-required", "distributed DP outside this node's SecAgg+ collect stage")
        plan, minimum = self._distributed_plan(), self.node.rules.dp.min_noise_contributors
        problem = ring_problem(ring, self.request.training.batch_size, plan.max_grad_norm, plan.noise_multiplier,
                               self.dimension)
        if ring.threshold < minimum:
            problem = f"threshold {ring.threshold} below this node's {minimum} noise contributors"
        if problem is not None:
            raise NodeRefusal("protocol-parameters", problem)
        return ring

    def gradient_share(self, global_arrays, ring: Ring) -> tuple[list, TrainResult, dict]:
        """Distributed DP: this round's noisy clipped gradient share on the ring's integer grid (to be
        masked), the result, and what the ledger records of it. The caller has checked `ring`."""
        from securefpt.learning.distributed_dp import ShareSpec, gradient_share

        plan, batch = self._distributed_plan(), self.request.training.batch_size
        contributors = ring.threshold  # any sum the coordinator can unmask holds at least this many shares
        scale = integer_scale(ring, batch)
        l2, l1 = rounded_sensitivity(scale * plan.max_grad_norm, self.dimension)
        spec = ShareSpec(sample_rate=plan.sample_rate, max_grad_norm=plan.max_grad_norm, scale=scale, l2=l2,
                         share_variance=share_variance(plan.noise_multiplier, l2, contributors), batch_size=batch)
        set_trainable(self.assembled.model, dict(global_arrays))
        values, result = gradient_share(self.assembled, self.data.train, self.shared_names(), spec)
        return values, result, {"l2": l2, "l1": l1, "contributors": contributors}

    def evaluate(self, arrays) -> EvalResult:
        set_trainable(self.assembled.model, self._with_own_head(arrays))
        return evaluate(self.assembled, self.data.eval, self.request.training.eval_batch_size)

    def personalize(self, arrays, seed: int) -> EvalResult:
        """Adapt the final global encoder (with this node's head) on its own data, keep the result in
        the node's state and evaluate it. Plain epochs, never DP: nothing of it leaves the node."""
        adapt = self.request.personalization
        set_trainable(self.assembled.model, self._with_own_head(arrays))
        plan = self.request.training.model_copy(update={"local_epochs": adapt.adapt_epochs, "proximal_mu": 0.0,
                                                        "lr": adapt.adapt_lr or self.request.training.lr})
        if adapt.adapt_epochs:
            progress = StepProgress(self.node.client_id, "personalizing", local_steps(len(self.data.train), plan))
            train_local(self.assembled, self.data.train, plan, seed, on_step=progress)
            progress.close()
        self.personal.keep_model(get_trainable(self.assembled.model))
        return evaluate(self.assembled, self.data.eval, self.request.training.eval_batch_size)


_RUNTIMES: "dict[tuple[str, int, str], NodeRuntime]" = {}


def get_runtime(node: Node, request: ExperimentRequest) -> NodeRuntime:
    # the node's file as read: an institution that edits its node.yaml (its bindings, its declared
    # labels) is judged by the new one from the next message on
    key = (str(node.path), node.path.stat().st_mtime_ns if node.path.is_file() else 0, request.sha256())
    if key not in _RUNTIMES:
        if len(_RUNTIMES) >= 16:  # the frozen weights are one shared memory map; a runtime is small
            _RUNTIMES.pop(next(iter(_RUNTIMES)))
        _RUNTIMES[key] = NodeRuntime(node, request)
    return _RUNTIMES[key]
