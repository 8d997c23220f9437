"""Asynchronous, atomic Orbax checkpoints of the train state and the data iterator.

Layout of a run directory (one Orbax `CheckpointManager`):
  <dir>/<step>/state/   the train state pytree (params, opt_state, step, rng as raw key data), OCDBT/zarr
  <dir>/<step>/data/    the data stream's position: one JSON for the whole run (process 0 writes it), the
                        same whatever the number of processes, so a run resumes on another process count
  <dir>/<step>/_CHECKPOINT_METADATA, commit_success.txt
Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when every host has finished, so a
write cut short by a kill leaves a tmp directory that is never listed as a step (and is removed at the
next start). Saving blocks only for the device→host copy; the writes go on in the background.

Restore reads onto whatever shardings the target carries, so a run saved on one mesh resumes on another.
This file knows nothing of the train state's class: it takes any pytree, and a matching abstract tree
(jax.ShapeDtypeStruct leaves with .sharding) to restore into.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp



def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
  # Orbax stores plain arrays: typed PRNG keys go to disk as their raw uint32 data.
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_keys_to_data(abstract: Any) -> Any:
  def convert(x):
    if not _is_key(x):
      return x
    data = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)

  return jax.tree.map(convert, abstract)


def _data_to_keys(restored: Any, abstract: Any) -> Any:
  # The key implementation (threefry, rbg, ...) comes from the target's key dtype.
  return jax.tree.map(lambda r, a: jax.random.wrap_key_data(r, impl=a.dtype._impl) if _is_key(a) else r,
                      restored, abstract)


def saved_steps(directory: str) -> list[int]:
  """The finalized checkpoint steps under `directory`, read without starting a CheckpointManager (whose
  background threads a run that stops on a bad flag should never start)."""
  return sorted(ocp.path.step.checkpoint_steps(directory))


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints, one every `save_interval_steps` steps, and also every
  checkpoint whose step is a multiple of `keep_period` (if given)."""

  def __init__(self, directory: str, *, save_interval_steps: int = 1000, max_to_keep: int | None = 3,
               keep_period: int | None = None, async_save: bool = True, read_only: bool = False):
    # read_only: another run's checkpoints (RunConfig.init_state_from), which may still be writing.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps, max_to_keep=max_to_keep, keep_period=keep_period,
        enable_async_checkpointing=async_save, read_only=read_only,
        cleanup_tmp_directories=not read_only)  # remove the leftovers of a write cut short by a kill
    self.manager = ocp.CheckpointManager(directory, options=options)
    self.interval = save_interval_steps

  def should_save(self, step: int) -> bool:
    # On the interval only: Orbax's own policy would also save the first step a manager sees.
    return step % self.interval == 0

  def save(self, step: int, state: Any, data_iterator: Any | None = None, *, force: bool = False) -> bool:
    """Start saving `state` (and the iterator's position) as `step`, if due or `force`d.

    Returns once the arrays are copied to host, so the next (donating) train step may run; the data
    iterator's state is taken before returning too. Returns whether a save was started.
    """
    items = {"state": ocp.args.StandardSave(_keys_to_data(state))}
    if data_iterator is not None:
      items["data"] = ocp.args.JsonSave(data_iterator.get_state())  # global: process 0 writes it
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore(self, abstract_state: Any, data_iterator: Any | None = None,
              step: int | None = None) -> tuple[Any, Any]:
    """(state, data_iterator) of `step` (default: the latest), laid out as `abstract_state` says.

    `data_iterator`, if given, is a fresh iterator over the same stream (its state is global, the same on
    every process); its position is set to the saved one and it is returned.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
    items = {"state": ocp.args.StandardRestore(_abstract_keys_to_data(abstract_state))}
    if data_iterator is not None:
      items["data"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = _data_to_keys(out["state"], abstract_state)
    if data_iterator is not None:
      data_iterator.set_state(out["data"])
    return state, data_iterator

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the saves in flight and the start-up clean-up of temporary directories, then releases the
    manager. Orbax's close() does not wait for that clean-up thread; a process that exits right after
    (a run stopped by an error) then prints its traceback at interpreter shutdown."""
    await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)  # orbax 0.12
    if await_cleanup is not None:
      await_cleanup()
    self.manager.close()


