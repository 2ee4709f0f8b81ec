from __future__ import annotations

import logging

import torch
from accelerate.utils import broadcast
from trl import SFTTrainer

from ...core.trainer import DefenseTrainerMixin
from ...core.weight_perturbation import PendingGradientMixin, global_norm


logger = logging.getLogger(__name__)

ZERO3_REASON = (
    "Panacea moves the trainable weights in place to evaluate the perturbed harmful loss, which ZeRO-3's parameter "
    "shards do not allow (docs/design/integration.md §4.4, measured for Booster's identical step)."
)


class PanaceaTrainer(PendingGradientMixin, DefenseTrainerMixin, SFTTrainer):
    """
    Trainer for Panacea: fine-tuning with an adversarial weight perturbation, added to the weights after training.

    Per micro-batch, on a batch `hb` from the cycling harmful loader:

    1. `g_h = ∇h(w)`; `ε = ρ·g_h/(‖g_h‖ + 1e-7)` (ascent direction, global norm over the trainable parameters);
    2. `∇ min(h(w + ε), c)` at the moved weights, then exact restore of `w`;
    3. gradient `∇g(w) − λ·(∇min(h(w+ε), c) − ∇h(w))`, the extra term joining the one real backward (÷GA).

    When training ends, `w ← w + ε_last` (`add_eps=True`), so `save_model()` writes the perturbed weights. It trains
    during the fine-tuning stage (registered as `fine-tuning`) and includes that post-fine-tuning addition.
    The released code does not run (undefined `clip_loss_h`); this follows the paper's description.

    Takes every argument of [`~trl.SFTTrainer`] plus `harmful_dataset=`; `train_dataset` is the user's data.
    """

    extra_datasets = ("harmful",)
    unsupported_backends = {"zero3": ZERO3_REASON}
    locates_layers = True

    def setup_defense(self) -> None:
        self._harmful_batches = self.cycling_batches("harmful", self.args.harmful_batch_size)
        self.setup_weight_perturbation()
        # ε of the last micro-step, by parameter name (None until the first step)
        self.last_eps: dict[str, torch.Tensor] | None = None
        self.eps_added = False

    @property
    def _active(self) -> bool:
        # ε is needed for its gradient term (λ>0) or for the post-training addition
        return self.args.rho > 0 and (self.args.lamb > 0 or self.args.add_eps)

    def defense_state_dict(self):
        state = {"harmful_batches": self._harmful_batches.state_dict()}
        if self.last_eps is not None:
            state["last_eps"] = {name: t.detach().cpu() for name, t in self.last_eps.items()}
        return state

    def load_defense_state_dict(self, state):
        self._harmful_batches.load_state_dict(state["harmful_batches"])
        if "last_eps" in state:
            missing = set(self._trainable) ^ set(state["last_eps"])
            if missing:
                raise ValueError(
                    f"The checkpoint's Panacea ε does not match the trainable parameters ({sorted(missing)[:3]}...)."
                )
            self.last_eps = {n: state["last_eps"][n].to(p.device, p.dtype) for n, p in self._trainable.items()}

    # ------------------------------------------------------------------------------------------------- the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._active:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        lamb = self.args.lamb
        # ε = ρ·g_h/(‖g_h‖ + 1e-7) ascends h; ∇min(h(w + ε), c) is needed only for the λ term
        step = self.harmful_weight_step(
            model, next(self._harmful_batches), self.args.rho, moved=lamb > 0, loss_transform=self._clamped
        )
        self.last_eps = {name: e.detach().clone() for name, e in zip(self._trainable, step.shift)}
        self.log_metric("harmful_loss", step.loss)
        self.log_metric("harmful_grad_norm", step.norm)
        extra = None
        if lamb > 0:
            self.log_metric("harmful_loss_perturbed", step.moved_loss)
            extra = [-lamb * (m - g) for m, g in zip(step.moved_grads, step.grads)]
        return self.training_step_with_gradient(model, inputs, num_items_in_batch, extra)

    def _clamped(self, h: torch.Tensor) -> torch.Tensor:
        # min(h, c): above the clamp the gradient is zero, so detach and skip that backward altogether
        clamp = self.args.harmful_loss_clamp
        return h if h.item() <= clamp else h.detach().clamp(max=clamp)

    # ------------------------------------------------------------------------------------------ post-training ε
    @torch.no_grad()
    def add_last_eps(self) -> None:
        """`w ← w + ε_last` on the trainable parameters (once)."""
        if self.eps_added or self.last_eps is None:
            return
        if self.accelerator.num_processes > 1:
            # Each rank drew its own harmful batches, so its ε differs; every replica must add the same one. Rank 0's
            # is taken: it is the ε a checkpoint saved by rank 0 describes
            self.last_eps = {name: broadcast(eps.contiguous(), from_process=0) for name, eps in self.last_eps.items()}
        for name, param in self._trainable.items():
            param.add_(self.last_eps[name].to(param.device, param.dtype))
        self.eps_added = True
        logger.info(
            "Panacea: added the last ε (norm %.4g) to the trainable weights.",
            global_norm(list(self.last_eps.values())),
        )

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.args.add_eps:
            self.add_last_eps()
        return output
