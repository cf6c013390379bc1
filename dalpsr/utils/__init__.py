from dalpsr.utils.registry import (ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY,  # noqa: F401
                                   MODEL_REGISTRY, TRANSFORM_REGISTRY, Registry)
