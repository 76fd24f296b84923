"""Which timesteps a training step sees (uniform: `GaussianDiffusion.sample_timesteps`): improved DDPM's
loss-aware importance sampling ("loss-second-moment", the PITI release's choice for the base models: the noisy,
high-loss timesteps of the hybrid loss's VB term are seen more often), and a draw that leans to high noise."""

import numpy as np
import torch

def high_noise_timesteps(batch, num_timesteps, device, generator):
    """t = floor(T sqrt(u)), u uniform: p(t) grows linearly with t, so half the draws fall in the last
    30 % of the chain. Unweighted, so the objective itself leans to high noise, where x_t no longer
    shows the layout and only the condition can tell it: the toy models learn where things go
    several times faster with it (docs/results.md). Not the paper's (uniform)."""
    u = torch.rand(batch, generator=generator, device=generator.device)
    return (u.sqrt() * num_timesteps).long().clamp(max=num_timesteps - 1).to(device)

class LossAwareTimesteps:
    """Draw t with probability proportional to sqrt(E[loss_t^2]) (uniformly until every timestep has
    `history_per_term` losses), weighted by 1 / (T p_t) to keep the loss estimate unbiased; with several
    processes, `update` with the losses gathered from all."""

    def __init__(self, num_timesteps, history_per_term=10, uniform_prob=0.001):
        self.num_timesteps = num_timesteps
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._history = np.zeros((num_timesteps, history_per_term), dtype=np.float64)
        self._counts = np.zeros(num_timesteps, dtype=np.int64)

    def weights(self):
        """Unnormalised sampling weights, one per timestep (float64 numpy)."""
        if not (self._counts == self.history_per_term).all():
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self._history ** 2, axis=-1))
        w /= w.sum()
        # A floor keeps every timestep reachable, so no weight 1/(T p) explodes.
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def sample(self, batch, device, generator):
        """(timesteps, importance weights), both of length batch."""
        w = self.weights()
        p = torch.from_numpy(w / w.sum())
        t = torch.multinomial(p.to(generator.device), batch, replacement=True, generator=generator).cpu()
        return t.to(device), (1.0 / (self.num_timesteps * p[t])).float().to(device)

    def update(self, ts, losses):
        """Record per-sample losses (any sequence or tensor) for their timesteps."""
        for t, loss in zip(torch.as_tensor(ts).tolist(), torch.as_tensor(losses).tolist()):
            if self._counts[t] == self.history_per_term:
                self._history[t, :-1] = self._history[t, 1:]  # drop the oldest loss
                self._history[t, -1] = loss
            else:
                self._history[t, self._counts[t]] = loss
                self._counts[t] += 1

    def state_dict(self):
        """The loss history as tensors, for a checkpoint (resuming continues the same sampling)."""
        return {"history": torch.from_numpy(self._history.copy()), "counts": torch.from_numpy(self._counts.copy())}

    def load_state_dict(self, state):
        self._history = state["history"].numpy().copy()
        self._counts = state["counts"].numpy().copy()
