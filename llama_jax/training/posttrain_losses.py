"""Post-training losses (Llama 3 §4.1): SFT, DPO with the paper's two changes, the reward model.

Each is a `loss(model, params, batch) -> (loss_sum, aux)` for the one train step (training/step.py):
the loss and every aux entry are sums, aux["tokens"] is the count the step divides them by — loss
tokens for SFT, preference pairs for DPO and the reward model — so microbatches (which split whole
pairs) add up to exactly the full batch.

Preference batches ([B, C, T], C = 2: chosen, rejected; the contract in POSTTRAIN.md): inputs, targets,
segment_ids, positions, response_mask, format_mask, last_index [B, C], and for DPO ref_logp [B, C], the
reference model's log-probs from a scoring pass (`score_reference`) — data, never state.

DPO (Rafailov et al. 2023) as TRL's DPOTrainer writes it, with Δ = (π_c − π_r) − (ref_c − ref_r) over the
summed log-probs of the response tokens:
  sigmoid  −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)        (ε = label_smoothing, conservative DPO)
  ipo      (Δ − 1/(2β))²                          on length-averaged log-probs (TRL divides policy and
                                                   reference log-probs by the token count for "ipo")
  hinge    relu(1 − βΔ)
Llama 3 §4.1.4's changes: formatting tokens (headers, <|eot_id|>, <|eom_id|>) are masked out of both
responses' log-probs in the DPO term (mask = response_mask · (1 − format_mask)); and an NLL term with
coefficient 0.2 on the chosen response (as RPO, Pang et al. 2024). The NLL counts every chosen response
token *including* formatting tokens (response_mask): it is the SFT loss on the chosen response, and the
paper masks the formatting tokens out of the DPO term only — their likelihood is what the SFT model
learned and must keep (e.g. emitting <|eot_id|> to stop). Normalization: the mean over the chosen
response's tokens within each pair, summed over pairs (the step then divides by pairs: a mean over pairs
of per-pair mean NLLs). TRL instead averages over all chosen tokens of the batch, which does not add up
over microbatches; per pair it does.

Metrics (TRL's names; sums over pairs, the step reports them divided by the pair count):
rewards/chosen, rewards/rejected = β·(logp − ref_logp); rewards/accuracies = [r_c > r_r];
rewards/margins = r_c − r_r; logps/chosen, logps/rejected (policy, on the DPO mask; length-averaged for
ipo, as in TRL); nll_loss; dpo_loss (the DPO term alone).

Reward model (§4.1.2): Bradley–Terry −log σ(r_c − r_r) without the Llama 2 margin term; r is the scalar
head (ModelConfig.head = "reward") on the final normed hidden state of each row's last real token.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int

from llama_jax.config import ModelConfig
from llama_jax.errors import ConfigError
from llama_jax.model import factory
from llama_jax.model import params as params_lib
from llama_jax.parallel import batching, sharding
from llama_jax.training import losses

Batch = dict[str, Any]
DpoVariant = Literal["sigmoid", "ipo", "hinge"]

# SFT is next-token cross-entropy on the assistant tokens: exactly the pretraining loss on a batch whose
# loss_mask marks them (the data side builds it; POSTTRAIN.md). One function, not a copy.
sft_loss = losses.pretrain_loss


def _rows(x_BC: jax.Array) -> jax.Array:
  """[B, C, ...] → [B·C, ...]: both responses of a pair run as adjacent rows of one forward pass."""
  return x_BC.reshape(x_BC.shape[0] * x_BC.shape[1], *x_BC.shape[2:])


def token_logps(logits_BTV: Float[Array, "B T V"], targets_BT: Int[Array, "B T"]) -> Float[Array, "B T"]:
  """log p(target) per position, fp32."""
  # fp32: the log-probs are summed over a response and differenced twice; bf16 would drown Δ.
  logits_BTV = logits_BTV.astype(jnp.float32)
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  # A masked sum, not take_along_axis: with V sharded it reduces locally (as losses.cross_entropy).
  vocab_V = jnp.arange(logits_BTV.shape[-1])
  target_BT = jnp.sum(jnp.where(vocab_V == targets_BT[..., None], logits_BTV, 0.0), axis=-1)
  return target_BT - logz_BT


def response_token_logps(model: nn.Module, params: Any, batch: Batch) -> Float[Array, "B C T"]:
  """The model's log-prob of every target token of both responses of each pair."""
  b, c, t = batch["inputs"].shape
  logits_BTV = model.apply({"params": params}, _rows(batch["inputs"]), _rows(batch["positions"]),
                           _rows(batch["segment_ids"]))
  return token_logps(logits_BTV, _rows(batch["targets"])).reshape(b, c, t)


def dpo_mask(batch: Batch) -> Float[Array, "B C T"]:
  """The DPO term's tokens: the response without its formatting tokens (Llama 3 §4.1.4)."""
  return batch["response_mask"].astype(jnp.float32) * (1.0 - batch["format_mask"].astype(jnp.float32))


def dpo_loss(model: nn.Module, params: Any, batch: Batch, *, beta: float = 0.1,
             label_smoothing: float = 0.0, variant: DpoVariant = "sigmoid",
             nll_coef: float = 0.2) -> tuple[jax.Array, losses.Aux]:
  """DPO (+ nll_coef × NLL of the chosen response) summed over pairs; aux: pairs and TRL's metric sums.

  Use with the train step as `functools.partial(dpo_loss, beta=..., variant=...)`. A pair without any
  response token (batch padding) counts for nothing.
  """
  return dpo_from_logps(response_token_logps(model, params, batch), batch, beta=beta,
                        label_smoothing=label_smoothing, variant=variant, nll_coef=nll_coef)


def dpo_from_logps(logp_BCT: Float[Array, "B C T"], batch: Batch, *, beta: float = 0.1,
                   label_smoothing: float = 0.0, variant: DpoVariant = "sigmoid",
                   nll_coef: float = 0.2) -> tuple[jax.Array, losses.Aux]:
  """dpo_loss from the policy's per-token log-probs (the formulas, apart from the forward pass)."""
  if variant not in DpoVariant.__args__:
    raise ConfigError(f"dpo_loss: variant={variant!r}; choose one of {DpoVariant.__args__}.")
  if not beta > 0:
    raise ConfigError(f"dpo_loss: beta={beta}; use beta > 0 (the paper's DPO runs use 0.1).")
  if label_smoothing and (variant != "sigmoid" or not 0 < label_smoothing < 0.5):
    raise ConfigError(f"dpo_loss: label_smoothing={label_smoothing} with variant={variant!r}; label "
                      "smoothing is for variant='sigmoid', with 0 <= label_smoothing < 0.5.")
  if "ref_logp" not in batch:
    raise ConfigError("dpo_loss: the batch has no ref_logp; score it first with "
                      "posttrain_losses.add_reference_logps(score_reference(...), ref_params, batch, mesh).")
  mask_BCT = dpo_mask(batch)
  logp_BC = jnp.sum(logp_BCT * mask_BCT, axis=-1)
  # The reference log-probs are data from the scoring pass: no gradient reaches them.
  ref_BC = jax.lax.stop_gradient(batch["ref_logp"].astype(jnp.float32))
  if variant == "ipo":  # TRL: length-averaged log-probs, policy and reference alike
    n_BC = jnp.maximum(jnp.sum(mask_BCT, axis=-1), 1.0)
    logp_BC, ref_BC = logp_BC / n_BC, ref_BC / n_BC
  delta_B = (logp_BC[:, 0] - logp_BC[:, 1]) - (ref_BC[:, 0] - ref_BC[:, 1])
  if variant == "sigmoid":
    term_B = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * delta_B)
              - label_smoothing * jax.nn.log_sigmoid(-beta * delta_B))
  elif variant == "ipo":
    term_B = (delta_B - 1.0 / (2.0 * beta)) ** 2
  else:  # hinge
    term_B = jax.nn.relu(1.0 - beta * delta_B)

  # NLL on the chosen response, formatting tokens included; per-pair token mean.
  chosen_mask_BT = batch["response_mask"][:, 0].astype(jnp.float32)
  n_chosen_B = jnp.maximum(jnp.sum(chosen_mask_BT, axis=-1), 1.0)
  nll_B = -jnp.sum(logp_BCT[:, 0] * chosen_mask_BT, axis=-1) / n_chosen_B

  pair_B = (jnp.sum(batch["response_mask"].astype(jnp.float32), axis=(1, 2)) > 0).astype(jnp.float32)
  loss_sum = jnp.sum(pair_B * (term_B + nll_coef * nll_B))
  rewards_BC = jax.lax.stop_gradient(beta * (logp_BC - ref_BC))
  logp_BC = jax.lax.stop_gradient(logp_BC)
  psum = lambda x_B: jnp.sum(pair_B * x_B)
  aux = {
      "tokens": jnp.sum(pair_B),
      "rewards/chosen": psum(rewards_BC[:, 0]),
      "rewards/rejected": psum(rewards_BC[:, 1]),
      "rewards/accuracies": psum((rewards_BC[:, 0] > rewards_BC[:, 1]).astype(jnp.float32)),
      "rewards/margins": psum(rewards_BC[:, 0] - rewards_BC[:, 1]),
      "logps/chosen": psum(logp_BC[:, 0]),
      "logps/rejected": psum(logp_BC[:, 1]),
      "nll_loss": psum(jax.lax.stop_gradient(nll_B)),
      "dpo_loss": psum(jax.lax.stop_gradient(term_B)),
  }
  return loss_sum, aux


def reference_logps(model: nn.Module, params: Any, batch: Batch) -> Float[Array, "B C"]:
  """Summed log-probs over the DPO mask: the scoring pass's `ref_logp` (the sum for every variant;
  dpo_loss length-averages both sides itself for ipo)."""
  return jnp.sum(response_token_logps(model, params, batch) * dpo_mask(batch), axis=-1)


def score_reference(model_cfg: ModelConfig, mesh: Mesh) -> Callable[[Any, Batch], jax.Array]:
  """`score(ref_params, batch) -> ref_logp [B, C]` fp32, jitted once, the batch split over B as in
  training. `ref_params` are the reference (e.g. the SFT) model's, laid out like the policy's."""
  if model_cfg.head != "lm":
    raise ConfigError(f"score_reference: ModelConfig.head is {model_cfg.head!r}; the reference "
                      "model of DPO is a language model (head='lm').")
  model = factory.make_model(model_cfg)
  jitted = jax.jit(lambda p, batch: reference_logps(model, p, batch),
                   in_shardings=(params_lib.param_shardings(model_cfg, mesh),
                                 sharding.batch_sharding(mesh, ndim=1)),
                   out_shardings=NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES, None)))
  rules = sharding.logical_rules(model_cfg, mesh)

  def score(params, batch):
    with sharding.use(mesh, rules):
      return jitted(params, batch)

  return score


_SCORED = ("inputs", "targets", "segment_ids", "positions", "response_mask", "format_mask")


def add_reference_logps(score: Callable[[Any, Batch], jax.Array], ref_params: Any, batch: Batch,
                        mesh: Mesh) -> Batch:
  """The host batch with `ref_logp` [B, C] float32 added (a new dict; `batch` is not changed).

  Runs on every process with the whole-batch host arrays, as parallel/batching.global_batch takes them;
  this process's rows of ref_logp are filled (the only ones its devices will read), others are 0.
  """
  ref = score(ref_params, batching.global_batch({k: batch[k] for k in _SCORED}, mesh))
  out = np.zeros(ref.shape, np.float32)
  for shard in ref.addressable_shards:
    out[shard.index] = np.asarray(shard.data, np.float32)
  return {**batch, "ref_logp": out}


def reward_loss(model: nn.Module, params: Any, batch: Batch) -> tuple[jax.Array, losses.Aux]:
  """Bradley–Terry −log σ(r_c − r_r) summed over pairs (no margin term, Llama 3 §4.1.2); aux: pairs,
  accuracy (r_c > r_r), rewards/chosen, rewards/rejected, rewards/margins — all sums over pairs."""
  b, c, _ = batch["inputs"].shape
  reward_BC = model.apply({"params": params}, _rows(batch["inputs"]), _rows(batch["positions"]),
                          _rows(batch["segment_ids"]), last_index_B=_rows(batch["last_index"]))
  # fp32: a loss on a difference of two rewards.
  reward_BC = reward_BC.astype(jnp.float32).reshape(b, c)
  margin_B = reward_BC[:, 0] - reward_BC[:, 1]
  pair_B = (jnp.sum(batch["response_mask"].astype(jnp.float32), axis=(1, 2)) > 0).astype(jnp.float32)
  loss_sum = jnp.sum(pair_B * -jax.nn.log_sigmoid(margin_B))
  r_BC, m_B = jax.lax.stop_gradient(reward_BC), jax.lax.stop_gradient(margin_B)
  aux = {
      "tokens": jnp.sum(pair_B),
      "accuracy": jnp.sum(pair_B * (m_B > 0).astype(jnp.float32)),
      "rewards/chosen": jnp.sum(pair_B * r_BC[:, 0]),
      "rewards/rejected": jnp.sum(pair_B * r_BC[:, 1]),
      "rewards/margins": jnp.sum(pair_B * m_B),
  }
  return loss_sum, aux
