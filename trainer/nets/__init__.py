from trainer.nets.model import RepNet, build_model, reparameterize
from trainer.nets.specs import ARCHITECTURES, EG_REPVGG, REPVGG_A0, get_spec

__all__ = ["ARCHITECTURES", "EG_REPVGG", "REPVGG_A0", "RepNet", "build_model", "get_spec", "reparameterize"]
