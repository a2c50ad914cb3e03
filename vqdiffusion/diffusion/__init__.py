"""Discrete mask-and-replace diffusion (VQ-Diffusion, Gu et al. 2022, sec. 3-4; docs/design.md §3-6).

Pure functions over tensors plus a frozen schedule dataclass; no ``nn.Module`` state.  One module per job,
lowest first: :mod:`.random` (draws with explicit generators), :mod:`.tables` (the cumulative table and
step indices as tensors), :mod:`.posterior` (q(x_t | x0) and p(x_s | x_t)), :mod:`.schedule` (the schedule
and step subsets), :mod:`.adjustments` (guidance, temperature, truncation of log p(x0 | x_t)),
:mod:`.budget` (the fixed-budget samplers' step math) and :mod:`.loss` (the objective and the importance
sampler of training steps).  Every public name is re-exported here: ``from vqdiffusion.diffusion import X``.

Conventions (used everywhere in the package):

* Token values ``0..K-1`` are real codebook entries, value ``K`` is [MASK] (``mask_id == K``).
* Steps are 0-based: index ``i`` is the paper's step ``i + 1``; ``i = 0`` is the first noising step and
  ``i = T - 1`` the last.  The index ``-1`` names the clean data x0 (cumulative alpha 1, gamma 0); it is
  handled explicitly, never by wrap-around indexing.
* ``log_p_x0`` tensors are ``[B, K, N]`` (classes on dim 1, N = h * w positions); distributions over
  x_t or x_s include [MASK] and are ``[B, K + 1, N]``.
"""

from __future__ import annotations

from .adjustments import (
    MASS_QUANTUM_BITS,
    guided_log_probs,
    guided_logits,
    log_softmax_classes,
    temper_log_probs,
    truncate_log_probs,
    truncation_quanta,
)
from .budget import (
    PRIOR_RULES,
    ordered_unmask_step,
    prior_unmask_step,
    purity_scores,
    select_positions,
    unmask_budget,
)
from .loss import ImportanceTimestepSampler, LossTerms, diffusion_loss, log_one_hot
from .posterior import LOG_EPS, posterior_log_probs, q_sample
from .random import Generator, check_generators, rand_uniform, sample_categorical
from .schedule import (
    MASKING_SHAPES,
    SPACINGS,
    MaskingSchedule,
    MaskReplaceSchedule,
    check_timesteps,
    masked_fraction,
    spaced_timesteps,
    uniform_timesteps,
)
from .tables import ScheduleTable

__all__ = [
    "LOG_EPS",
    "MASKING_SHAPES",
    "MASS_QUANTUM_BITS",
    "PRIOR_RULES",
    "SPACINGS",
    "Generator",
    "ImportanceTimestepSampler",
    "LossTerms",
    "MaskReplaceSchedule",
    "MaskingSchedule",
    "ScheduleTable",
    "check_generators",
    "check_timesteps",
    "diffusion_loss",
    "guided_log_probs",
    "guided_logits",
    "log_one_hot",
    "log_softmax_classes",
    "masked_fraction",
    "ordered_unmask_step",
    "posterior_log_probs",
    "prior_unmask_step",
    "purity_scores",
    "q_sample",
    "rand_uniform",
    "sample_categorical",
    "select_positions",
    "spaced_timesteps",
    "temper_log_probs",
    "truncate_log_probs",
    "truncation_quanta",
    "uniform_timesteps",
    "unmask_budget",
]
