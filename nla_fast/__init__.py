"""nla_fast: fast, faithful NLA (Navigating Label Ambiguity, AAAI 2025) for facial expression recognition."""
from .config import NLAConfig, eps_schedule
from .loss import BackendUnavailable, NLALoss, naw_weight, nla_loss
from .evaluation import load_model
from .inference import predict

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailable", "NLAConfig", "NLALoss", "eps_schedule", "load_model", "naw_weight", "nla_loss", "predict",
]
