"""Fine-tuning methods, each one module with one config dataclass. Register new ones in METHODS."""

from .base import Generated, InferenceMethod, IterationContext, Method, MethodConfig, Rollout, ValueHeadMethod
from .best_of_n import BestOfN, BestOfNConfig
from .d3po import D3PO, D3POConfig
from .ddpo import DDPO, DDPOConfig
from .dense_dpo import DenseDPO, DenseDPOConfig
from .diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
from .direct_backprop import AlignProp, AlignPropConfig, DRaFT, DRaFTConfig, ReFL, ReFLConfig
from .dpok import DPOK, DPOKConfig
from .dro import DRO, DROConfig
from .fk_steering import FKSteering, FKSteeringConfig
from .inpo import InPO, InPOConfig
from .prdp import PRDP, PRDPConfig
from .rlcm import RLCM, RLCMConfig
from .score_as_action import ScoreAsAction, ScoreAsActionConfig
from .sqdf import SQDF, SQDFConfig, SQDFPaper, SQDFPaperConfig

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (SQDF, SQDFPaper, DDPO, DPOK, DRaFT, AlignProp, ReFL, PRDP, BestOfN, FKSteering,
                ScoreAsAction, RLCM, D3PO, DenseDPO, DiffusionDPO, InPO, DRO)
}

__all__ = [
    "METHODS", "Generated", "InferenceMethod", "IterationContext", "Method", "MethodConfig", "Rollout",
    "ValueHeadMethod", "SQDF", "SQDFConfig", "SQDFPaper", "SQDFPaperConfig", "DDPO", "DDPOConfig", "DPOK",
    "DPOKConfig", "DRaFT", "DRaFTConfig", "AlignProp", "AlignPropConfig", "ReFL", "ReFLConfig", "PRDP", "PRDPConfig",
    "BestOfN", "BestOfNConfig", "FKSteering", "FKSteeringConfig", "ScoreAsAction", "ScoreAsActionConfig", "RLCM",
    "RLCMConfig", "D3PO", "D3POConfig", "DenseDPO", "DenseDPOConfig", "DiffusionDPO", "DiffusionDPOConfig", "InPO",
    "InPOConfig", "DRO", "DROConfig",
]
