"""The networks' primitives: convolutions, pools and batch normalisation, and the
``Execution`` that chooses how they compute."""

from jaxnas.ops.conv import CONV_IMPLS, check_conv_impl, conv2d, conv_impl, conv_init
from jaxnas.ops.depthwise import depthwise, depthwise_reference, depthwise_taps, pointwise
from jaxnas.ops.execution import Execution
from jaxnas.ops.norm import BN_EPSILON, BatchNorm, batch_norm, bn_normalize
from jaxnas.ops.pool import (POOL_IMPLS, avg_pool_2x2, avg_pool_3x3, check_pool_impl,
                             max_pool_3x3, max_pool_reference, pool_impl)

__all__ = ["BN_EPSILON", "BatchNorm", "CONV_IMPLS", "Execution", "POOL_IMPLS", "avg_pool_2x2",
           "avg_pool_3x3", "batch_norm", "bn_normalize", "check_conv_impl", "check_pool_impl",
           "conv2d", "conv_impl", "conv_init", "depthwise", "depthwise_reference",
           "depthwise_taps", "max_pool_3x3", "max_pool_reference", "pointwise", "pool_impl"]
