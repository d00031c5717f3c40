"""dynlm: a language model whose weights keep learning while it reads (Wolf et al. 2018)."""

from dynlm_pl import resolvers as _resolvers

__version__ = "0.1.0"

_resolvers.register()  # conf/paths/default.yaml's run_dir uses ${dynlm.sweep_subdir:}
