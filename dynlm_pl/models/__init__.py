"""Pure nn.Modules: the language model and the meta-learner."""

from dynlm_pl.models.awd_lstm import AWDLSTM, LMOutput, detach_hidden, lm_loss

__all__ = ["AWDLSTM", "LMOutput", "detach_hidden", "lm_loss"]
