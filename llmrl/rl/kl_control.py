"""KL coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", 2.2)."""
from __future__ import annotations


class FixedKLController:
    """Keeps beta constant."""

    def __init__(self, init_kl_coef: float):
        self.value = float(init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Moves beta towards a target KL: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon.

    ``current_kl`` is the mean over sequences of the summed per-token KL, ``n_steps`` the number of
    sequences seen in this update (Ziegler et al. 2019, eq. 2).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float, clip: float = 0.2):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.clip = float(clip)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -self.clip), self.clip)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def make_kl_controller(init_kl_coef: float, adaptive: bool, target: float, horizon: float):
    if adaptive:
        return AdaptiveKLController(init_kl_coef, target, horizon)
    return FixedKLController(init_kl_coef)
