"""Learning the projections: tasks, small transformers, training, generation, the experiment.

The seeds claim that learned W_Q, W_K and W_V beat attention over fixed input
similarity. This package makes that claim testable: :mod:`~qkv.train.variants`
builds attention with no, some or all projections learned, :mod:`~qkv.train.models`
puts it in small transformers, :mod:`~qkv.train.tasks` generates the data,
:mod:`~qkv.train.trainer` trains (exactly resumable, optionally under torchrun),
:mod:`~qkv.train.generate` decodes with a KV cache, and
:mod:`~qkv.train.experiment` runs the comparison. Importing it is cheap: nothing
trains at import time.
"""

from .models import DecoderOnly, EncoderDecoder, ModelConfig, ModelOutput, build_model
from .tasks import TASKS, make_task
from .trainer import TrainConfig, TrainingDiverged, train
from .variants import VARIANTS, make_attention

__all__ = [
    "TASKS",
    "VARIANTS",
    "DecoderOnly",
    "EncoderDecoder",
    "ModelConfig",
    "ModelOutput",
    "TrainConfig",
    "TrainingDiverged",
    "build_model",
    "make_attention",
    "make_task",
    "train",
]
