"""Parallel strategies, one module each; each applies itself to an unmodified model.

``distgen.parallel.cfg``    split the classifier-free-guidance batch over 2 ranks
``distgen.parallel.patch``  latent row bands: sync / displaced (DistriFusion) / partial (PCPP) / naive
"""
