"""Which Lightning strategies the callbacks support: plain torch weights on every process."""

from __future__ import annotations

from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.strategies.single_xla import SingleDeviceXLAStrategy
from lightning.pytorch.strategies.xla import XLAStrategy
from lightning.pytorch.utilities import rank_zero_warn

SUPPORTED_STRATEGIES = (
    "a single device, or DDP: strategy='ddp' (or 'ddp_spawn', 'ddp_fork', 'ddp_notebook', "
    "'ddp_find_unused_parameters_true', DDPStrategy(...))"
)
#: Strategies that shard or re-wrap parameters. Matched by class and, so that DeepSpeed is
#: recognised without importing it, by class name.
SHARDED_STRATEGIES: tuple[type[Strategy], ...] = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
SHARDED_STRATEGY_NAMES = ("FSDP", "DeepSpeed", "ModelParallel")


def check_strategy(strategy: Strategy, who: str) -> None:
    """Refuse strategies that shard parameters; warn about those this package is not tested with.

    Raises:
        ValueError: for FSDP, DeepSpeed and model-parallel strategies.
    """
    name = type(strategy).__name__
    class_names = [cls.__name__ for cls in type(strategy).__mro__]
    if isinstance(strategy, SHARDED_STRATEGIES) or any(
        part in cls_name for cls_name in class_names for part in SHARDED_STRATEGY_NAMES
    ):
        raise ValueError(
            f"{who} does not support {name}: it shards or re-wraps the parameters, while the quantizers take their "
            "ranges from whole weights, the bit budget reads every quantizer on every process, and the integer "
            f"conversion needs whole weights. Supported: {SUPPORTED_STRATEGIES}."
        )
    if isinstance(strategy, (XLAStrategy, SingleDeviceXLAStrategy)) or not isinstance(
        strategy, (SingleDeviceStrategy, DDPStrategy)
    ):
        rank_zero_warn(f"{who} is not tested with {name}; it is tested with {SUPPORTED_STRATEGIES}")


def spawns_processes(strategy: Strategy) -> bool:
    """Whether the strategy runs fit in worker processes and copies results back (ddp_spawn and the like)."""
    return isinstance(getattr(strategy, "launcher", None), _MultiProcessingLauncher)
